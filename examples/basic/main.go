// Command basic is the shortest complete use of sandboxpool: one Manager,
// one Acquire, one Release. It runs against the in-process fake E2B server
// so it works anywhere; with E2B_API_KEY set it uses real E2B instead.
package main

import (
	"context"
	"fmt"
	"log"
	"os"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
)

func main() {
	cfg, err := sandboxpool.ConfigFromEnv() // E2B_API_KEY, REDIS_URL, SANDBOXPOOL_*
	if err != nil {
		log.Fatal(err)
	}
	if os.Getenv("E2B_API_KEY") == "" {
		fake := e2btest.Start(e2btest.Config{})
		defer fake.Close()
		client, err := e2b.New(fake.ClientOptions())
		if err != nil {
			log.Fatal(err)
		}
		cfg.Provider = sandboxpool.NewE2BProvider(client)
	}
	m, err := sandboxpool.New(cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close(context.Background())

	lease, err := m.Acquire(context.Background(), "alice", "my-project")
	if err != nil {
		log.Fatal(err)
	}
	defer lease.Release()
	fmt.Println("sandbox", lease.Sandbox().ID, "envd at", lease.Sandbox().EnvdURL())
}
