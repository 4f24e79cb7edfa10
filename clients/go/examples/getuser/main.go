// Command getuser reads key "1" of namespace "users" from a cachecoord server
// and prints its JSON.
//
//	go run ./examples/getuser [127.0.0.1:50051]
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"

	cachecoordv1 "github.com/cachecoord/cachecoord/clients/go/cachecoordv1"
)

func main() {
	target := "127.0.0.1:50051"
	if len(os.Args) > 1 {
		target = os.Args[1]
	}
	// Plaintext; for TLS use grpc.WithTransportCredentials(credentials.NewTLS(...)).
	// (grpc.WithInsecure, not credentials/insecure: the latter needs grpc-go
	// 1.34, and Debian bookworm ships 1.33.3.)
	conn, err := grpc.Dial(target, grpc.WithInsecure())
	if err != nil {
		fmt.Fprintf(os.Stderr, "cachecoord: %v\n", err)
		os.Exit(1)
	}
	defer conn.Close()
	client := cachecoordv1.NewCacheCoordServiceClient(conn)

	// Always give a deadline: a call without one can wait forever.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	user, err := client.Get(ctx, &cachecoordv1.GetRequest{Namespace: "users", Key: "1"})
	if err != nil {
		fmt.Fprintf(os.Stderr, "cachecoord: %v\n", err) // a gRPC status: codes.NotFound, ...
		os.Exit(1)
	}
	if !user.GetFound() {
		fmt.Fprintln(os.Stderr, `no key "1" in namespace "users"`)
		os.Exit(1)
	}
	// Mapped namespaces hold a JSON object with the row's columns.
	fmt.Println(string(user.GetValue()))
	fmt.Printf("version %d, layer %s, stale %t\n", user.GetVersion(), user.GetLayer(), user.GetStale())
}
