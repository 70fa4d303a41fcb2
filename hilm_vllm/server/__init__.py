"""Service shells for the tiers: they translate between protobuf and domain objects."""
