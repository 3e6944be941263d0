"""The server's core: work units, sessions and their exactly-once state. No grpc, no protobuf here."""
