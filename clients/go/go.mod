module github.com/cachecoord/cachecoord/clients/go

go 1.19

require (
	google.golang.org/grpc v1.34.0
	google.golang.org/protobuf v1.28.1
)
