"""quiltctl, the command line client."""
