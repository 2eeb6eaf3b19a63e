"""The ``moe-lab`` command line. Each subcommand lives in its own ``cmd_<name>.py`` module."""
