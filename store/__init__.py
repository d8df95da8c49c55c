"""The storage layer shared by the stages and the driver: where outputs go and how they are named, the manifest,
output formats, leases and run records."""
