module github.com/cachecoord/cachecoord/clients/go

go 1.19

// The oldest versions the stubs and the example are built and run with in CI:
// Debian bookworm's golang-google-grpc-dev and golang-google-protobuf-dev
// (tests/integration/test_go_client.py).
require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
