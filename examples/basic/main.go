// Command basic is the shortest complete use of sandboxpool: one Manager,
// one Acquire, one Release. It runs against the in-process fake E2B server
// so it works anywhere; with E2B_API_KEY set it uses real E2B instead.
package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"os"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
)

func main() {
	if err := run(context.Background(), os.Stdout); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, out io.Writer) error {
	cfg, err := sandboxpool.ConfigFromEnv() // E2B_API_KEY, REDIS_URL, SANDBOXPOOL_*
	if err != nil {
		return err
	}
	if cfg.Redis != nil {
		defer cfg.Redis.Close() // yours to close, after the Manager (deferred below, so closed first)
	}
	if os.Getenv("E2B_API_KEY") == "" {
		fake := e2btest.Start(e2btest.Config{})
		defer fake.Close()
		client, err := e2b.New(fake.ClientOptions())
		if err != nil {
			return err
		}
		cfg.Provider = sandboxpool.NewE2BProvider(client)
	}
	m, err := sandboxpool.New(cfg)
	if err != nil {
		return err
	}
	defer m.Close(ctx)

	lease, err := m.Acquire(ctx, "alice", "my-project")
	if err != nil {
		return err
	}
	defer lease.Release()
	_, err = fmt.Fprintln(out, "sandbox", lease.Sandbox().ID, "envd at", lease.Sandbox().EnvdURL())
	return err
}
