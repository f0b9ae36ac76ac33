"""Version of the SDK, kept equal to the published release it is compatible with."""

VERSION = "0.0.3"
