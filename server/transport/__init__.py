"""The transport: gRPC in, the data plane's work, gRPC out. The only server package that talks gRPC.

server.py builds and runs the gRPC server; rpc.py turns raw request bytes into parsed requests for every
method of both services; status.py is the one table from domain errors to status codes; pump.py is the one
stream pump both streaming methods run; auth.py and tls.py guard the port. native/ and kserve/ are the two
APIs, each a thin servicer plus a codec that decodes each wire form into checked steps for the data plane and
encodes their outcomes as responses.
"""
