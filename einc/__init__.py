"""einc: a symbolic structure compiler for efficient linear layers."""
