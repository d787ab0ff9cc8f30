"""The control plane: the command line, studies, tracking and reports."""
