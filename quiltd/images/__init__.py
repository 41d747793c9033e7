"""Images: safe extraction of archives, OCI and docker layouts, layers kept once, registry pulls."""
