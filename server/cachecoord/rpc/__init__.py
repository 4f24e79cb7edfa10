"""The gRPC front-end: servicer, status mapping, server assembly."""
