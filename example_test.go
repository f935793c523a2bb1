package sandboxpool_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
)

// A Manager gives each (user, project) one sandbox and hands it out again.
func ExampleManager_Acquire() {
	fake := e2btest.Start(e2btest.Config{}) // or real E2B: e2b.New(e2b.Options{APIKey: …})
	defer fake.Close()
	client, _ := e2b.New(fake.ClientOptions())

	m, err := sandboxpool.New(sandboxpool.Config{Provider: sandboxpool.NewE2BProvider(client)})
	if err != nil {
		panic(err)
	}
	defer m.Close(context.Background())

	ctx := context.Background()
	first, _ := m.Acquire(ctx, "alice", "demo")
	first.Release()
	again, _ := m.Acquire(ctx, "alice", "demo")
	defer again.Release()

	fmt.Println("same sandbox:", first.Sandbox().ID == again.Sandbox().ID)
	fmt.Println("first reused:", first.Reused(), "then:", again.Reused())
	fmt.Println("creates:", m.Stats().Creates)
	// Output:
	// same sandbox: true
	// first reused: false then: true
	// creates: 1
}

// Instances of a service that share a Redis give a pair one sandbox, even
// when both meet the pair at once: one creates it, the other waits on the
// pair's lock and reuses it.
func Example_instances() {
	mr, _ := miniredis.Run() // or your Redis: every instance names the same one
	defer mr.Close()
	fake := e2btest.Start(e2btest.Config{})
	defer fake.Close()
	client, _ := e2b.New(fake.ClientOptions())
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr()})
	defer rdb.Close() // after the Managers: Close leaves Config.Redis open

	ctx := context.Background()
	ids := make([]string, 2)
	var wg sync.WaitGroup
	for i := range ids { // two instances, each meeting the pair at once
		m, err := sandboxpool.New(sandboxpool.Config{Provider: sandboxpool.NewE2BProvider(client), Redis: rdb})
		if err != nil {
			panic(err)
		}
		defer m.Close(ctx)
		wg.Go(func() {
			err := m.Use(ctx, "alice", "demo", func(sb sandboxpool.Sandbox) error {
				ids[i] = sb.ID
				return nil
			})
			if err != nil {
				panic(err)
			}
		})
	}
	wg.Wait()
	fmt.Println("same sandbox:", ids[0] == ids[1])
	fmt.Println("sandboxes at E2B:", len(fake.Running()))
	// Output:
	// same sandbox: true
	// sandboxes at E2B: 1
}

// Remove destroys the pair's sandbox (a user deleting a project, say): the
// next Acquire creates a new one.
func ExampleManager_Remove() {
	fake := e2btest.Start(e2btest.Config{})
	defer fake.Close()
	client, _ := e2b.New(fake.ClientOptions())
	m, err := sandboxpool.New(sandboxpool.Config{Provider: sandboxpool.NewE2BProvider(client)})
	if err != nil {
		panic(err)
	}
	defer m.Close(context.Background())

	ctx := context.Background()
	first, _ := m.Acquire(ctx, "alice", "demo")
	first.Release()
	if err := m.Remove(ctx, "alice", "demo"); err != nil {
		panic(err)
	}
	fmt.Println("running after Remove:", len(fake.Running()))

	next, _ := m.Acquire(ctx, "alice", "demo")
	defer next.Release()
	fmt.Println("new sandbox:", next.Sandbox().ID != first.Sandbox().ID, "created:", next.Outcome() == sandboxpool.OutcomeCreated)
	// Output:
	// running after Remove: 0
	// new sandbox: true created: true
}

// Invalid ids are refused before any I/O, with the field and the reason.
func ExampleValidateIDs() {
	err := sandboxpool.ValidateIDs("alice", "proj:*")
	var ve *sandboxpool.ValidationError
	fmt.Println(errors.Is(err, sandboxpool.ErrInvalidID), errors.As(err, &ve), ve.Field)
	// Output: true true project
}

// Secrets print masked, whatever the verb.
func ExampleSecret() {
	key := sandboxpool.NewSecret("e2b_0123456789")
	fmt.Printf("%s %v %q %#v\n", key, key, key, key)
	// Output: [REDACTED] [REDACTED] [REDACTED] [REDACTED]
}

// RetryAfter reads the hint of a rate-limited create.
func ExampleRetryAfter() {
	err := fmt.Errorf("acquire: %w", &sandboxpool.RetryAfterError{Err: sandboxpool.ErrRateLimited, RetryAfter: 3 * time.Second})
	d, ok := sandboxpool.RetryAfter(err)
	fmt.Println(errors.Is(err, sandboxpool.ErrRateLimited), d, ok)
	// Output: true 3s true
}

// A holder whose sandbox stopped working calls Recheck: the next Acquire
// probes the sandbox before handing it out, and replaces it if it is gone,
// where a memory hit would have handed it out again.
func ExampleLease_Recheck() {
	fake := e2btest.Start(e2btest.Config{})
	defer fake.Close()
	client, _ := e2b.New(fake.ClientOptions())
	m, err := sandboxpool.New(sandboxpool.Config{Provider: sandboxpool.NewE2BProvider(client)})
	if err != nil {
		panic(err)
	}
	defer m.Close(context.Background())

	ctx := context.Background()
	lease, _ := m.Acquire(ctx, "alice", "demo")
	broken := lease.Sandbox().ID
	fake.Vanish(broken) // E2B lost it: the holder's calls to its envd fail
	lease.Recheck()
	lease.Release()

	next, _ := m.Acquire(ctx, "alice", "demo")
	defer next.Release()
	fmt.Println("replaced:", next.Sandbox().ID != broken, "created:", next.Outcome() == sandboxpool.OutcomeCreated)
	// Output: replaced: true created: true
}
