// Command holdlock holds a lock with a HoldLock stream for a while, across
// the server's connection recycling, and says whether it kept it.
//
//	go run ./examples/holdlock [127.0.0.1:50051] [lock-name] [seconds]
//
// The server hands a hold off when it is about to close the stream's
// connection (max_connection_age, a drain, SIGTERM): it sends `handoff` and
// ends the stream OK without releasing the lock. holdLock below then opens a
// new stream that starts with `resume` (same token, same fencing token)
// before handoff.valid_for_ms runs out. Copy it into your program.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	cachecoordv1 "github.com/cachecoord/cachecoord/clients/go/cachecoordv1"
)

// HeldLock is a lock held by holdLock until Release.
type HeldLock struct {
	Token        string
	FencingToken int64
	// Lost is closed the moment the lock is lost; Err then says why.
	Lost    chan struct{}
	Err     error
	release context.CancelFunc
	done    chan struct{}
}

// Release lets go of the lock (the server releases it when the stream ends)
// and returns why the lock was lost, if it was.
func (h *HeldLock) Release() error {
	h.release()
	<-h.done
	return h.Err
}

// holdLock takes the lock and follows its streams in a goroutine, resuming
// the hold after each handoff; ctx bounds the wait for the lock only.
func holdLock(ctx context.Context, client cachecoordv1.CacheCoordServiceClient, name string, ttlMs int64) (*HeldLock, error) {
	holdCtx, release := context.WithCancel(context.Background())
	stream, err := client.HoldLock(holdCtx)
	if err != nil {
		release()
		return nil, err
	}
	acquire := &cachecoordv1.HoldLockRequest_Acquire{Name: name, TtlMs: ttlMs, Resumable: true}
	if err := stream.Send(&cachecoordv1.HoldLockRequest{Kind: &cachecoordv1.HoldLockRequest_Acquire_{Acquire: acquire}}); err != nil {
		release()
		return nil, err
	}
	first := make(chan error, 1)
	var reply *cachecoordv1.HoldLockResponse
	go func() { var e error; reply, e = stream.Recv(); first <- e }()
	select {
	case err := <-first:
		if err != nil {
			release()
			return nil, err
		}
	case <-ctx.Done():
		release()
		return nil, ctx.Err()
	}
	acquired := reply.GetAcquired()
	if acquired == nil {
		release()
		return nil, errors.New("HoldLock: the first reply is not `acquired`")
	}
	h := &HeldLock{Token: acquired.Token, FencingToken: acquired.FencingToken, Lost: make(chan struct{}), release: release, done: make(chan struct{})}
	go h.follow(holdCtx, client, name, ttlMs, stream)
	return h, nil
}

func (h *HeldLock) follow(ctx context.Context, client cachecoordv1.CacheCoordServiceClient, name string, ttlMs int64, stream cachecoordv1.CacheCoordService_HoldLockClient) {
	defer close(h.done)
	for {
		var handoff *cachecoordv1.HoldLockResponse_Handoff
		for {
			reply, err := stream.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				if ctx.Err() == nil { // not our own Release
					h.lose(fmt.Errorf("lock %q: the stream broke: %w", name, err))
				}
				return
			}
			if reply.GetLost() != nil {
				h.lose(fmt.Errorf("lock %q was lost while held", name))
			}
			if reply.GetHandoff() != nil {
				handoff = reply.GetHandoff()
			}
		}
		if handoff == nil || ctx.Err() != nil {
			return // released (or lost: already said)
		}
		validFor := time.Duration(float64(handoff.ValidForMs)*0.99)*time.Millisecond - 5*time.Millisecond
		next, err := resume(ctx, client, name, h.Token, h.FencingToken, ttlMs, time.Now().Add(validFor))
		if err != nil {
			h.lose(err)
			return
		}
		stream = next
	}
}

// resume opens streams that start with `resume` until one answers `acquired`
// with the same fencing token, retrying UNAVAILABLE until validUntil.
func resume(ctx context.Context, client cachecoordv1.CacheCoordServiceClient, name, token string, fencing, ttlMs int64, validUntil time.Time) (cachecoordv1.CacheCoordService_HoldLockClient, error) {
	retryIn := 20 * time.Millisecond
	request := &cachecoordv1.HoldLockRequest{Kind: &cachecoordv1.HoldLockRequest_Resume_{
		Resume: &cachecoordv1.HoldLockRequest_Resume{Name: name, Token: token, TtlMs: ttlMs},
	}}
	for time.Now().Before(validUntil) {
		stream, err := client.HoldLock(ctx)
		if err == nil {
			err = stream.Send(request)
		}
		var reply *cachecoordv1.HoldLockResponse
		if err == nil {
			reply, err = stream.Recv()
		}
		if err == nil {
			if a := reply.GetAcquired(); a != nil && a.FencingToken == fencing {
				return stream, nil
			}
			return nil, fmt.Errorf("lock %q was lost while handed off", name)
		}
		if c := status.Code(err); c != codes.Unavailable && c != codes.ResourceExhausted {
			return nil, fmt.Errorf("lock %q could not be resumed: %w", name, err)
		}
		time.Sleep(retryIn)
		if retryIn < 500*time.Millisecond {
			retryIn *= 2
		}
	}
	return nil, fmt.Errorf("lock %q could not be resumed before it expired", name)
}

func (h *HeldLock) lose(err error) {
	select {
	case <-h.Lost:
	default:
		h.Err = err
		close(h.Lost)
	}
}

func main() {
	target, name, seconds := "127.0.0.1:50051", "holdlock-example", 5
	if len(os.Args) > 1 {
		target = os.Args[1]
	}
	if len(os.Args) > 2 {
		name = os.Args[2]
	}
	if len(os.Args) > 3 {
		seconds, _ = strconv.Atoi(os.Args[3])
	}
	conn, err := grpc.Dial(target, grpc.WithInsecure())
	if err != nil {
		fmt.Fprintf(os.Stderr, "cachecoord: %v\n", err)
		os.Exit(1)
	}
	defer conn.Close()
	client := cachecoordv1.NewCacheCoordServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	lock, err := holdLock(ctx, client, name, 2000)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cachecoord: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("holding %q, fencing token %d\n", name, lock.FencingToken)
	select {
	case <-lock.Lost: // stop using the resource at once
		fmt.Fprintf(os.Stderr, "cachecoord: %v\n", lock.Err)
		os.Exit(1)
	case <-time.After(time.Duration(seconds) * time.Second): // the work
	}
	if err := lock.Release(); err != nil {
		fmt.Fprintf(os.Stderr, "cachecoord: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("held throughout, released")
}
