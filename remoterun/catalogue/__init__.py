"""The scripts directory: which files may run, their metadata and parameter schemas.

`directory` (the Catalogue: names confined to the folder, resolved, listed), `metadata` (the
Script a config.toml table or a sidecar describes, parsed and checked), `params` (the declared
parameters, and a submission's params checked against them). The names below are the
catalogue's public face.
"""

from remoterun.catalogue.directory import Catalogue
from remoterun.catalogue.metadata import MetadataError, Script, parse_metadata
from remoterun.catalogue.params import Param, Scalar, param_value

__all__ = ["Catalogue", "MetadataError", "Param", "Scalar", "Script", "param_value",
           "parse_metadata"]
