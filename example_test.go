package sandboxpool_test

import (
	"context"
	"errors"
	"fmt"
	"time"

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
