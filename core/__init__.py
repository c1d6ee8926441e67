"""What every room shares and that depends on no room: typed config loading (``core.config``) and its error."""
