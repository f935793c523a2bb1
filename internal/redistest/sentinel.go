package redistest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Sentinel is a master with one replica, watched by one Redis Sentinel
// that fails the master over to the replica once it stops answering.
type Sentinel struct {
	Addr       string // the sentinel's
	MasterName string
	Master     *Server
	Replica    *Server
	t          testing.TB
}

// sentinelDownAfter is how long the master may go unanswered before the
// sentinel judges it down and fails it over: Redis's default (30 s) would
// make a test wait that long.
const sentinelDownAfter = time.Second

// StartSentinel runs a master, its replica and a sentinel (redis-server
// --sentinel) that monitors the master with a quorum of one, and waits
// until the replica is in sync and the sentinel knows it.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	master := Start(t)
	host, port, _ := strings.Cut(master.Addr, ":")
	replica := Start(t, "--replicaof", host, port)
	s := &Sentinel{MasterName: "sandboxpool", Master: master, Replica: replica, t: t}
	dir := t.TempDir()
	conf := filepath.Join(dir, "sentinel.conf") // Sentinel rewrites it: it must be writable
	err := os.WriteFile(conf, []byte(strings.Join([]string{
		fmt.Sprintf("sentinel monitor %s %s %s 1", s.MasterName, host, port),
		fmt.Sprintf("sentinel down-after-milliseconds %s %d", s.MasterName, sentinelDownAfter.Milliseconds()),
		fmt.Sprintf("sentinel failover-timeout %s %d", s.MasterName, (10 * sentinelDownAfter).Milliseconds()),
		"",
	}, "\n")), 0o600)
	if err != nil {
		t.Fatalf("writing the sentinel's configuration: %v", err)
	}
	sp := freePort(t, false)
	sentinel := &Server{Addr: "127.0.0.1:" + strconv.Itoa(sp), port: sp, dir: dir, t: t, conf: conf, args: []string{"--sentinel"}}
	sentinel.Start()
	t.Cleanup(sentinel.Stop)
	s.Addr = sentinel.Addr
	sc := s.client()
	settle(t, "the sentinel never saw the replica in sync", func(ctx context.Context) (bool, string) {
		replicas, err := sc.Replicas(ctx, s.MasterName).Result()
		return err == nil && len(replicas) == 1 && replicas[0]["master-link-status"] == "ok", fmt.Sprintf("%v %v", err, replicas)
	})
	return s
}

// WaitFailover waits until the sentinel names the replica as the master
// (the test stopped or paused the master) and the replica serves as one.
// From then on Master names the promoted node, and Replica the former
// master, for Rejoin and a failover back.
func (s *Sentinel) WaitFailover() {
	s.t.Helper()
	sc, rc := s.client(), s.Replica.Client(s.t)
	settle(s.t, "the sentinel never failed the master over to the replica", func(ctx context.Context) (bool, string) {
		addr, err := sc.GetMasterAddrByName(ctx, s.MasterName).Result()
		if err != nil || len(addr) != 2 || addr[0]+":"+addr[1] != s.Replica.Addr {
			return false, fmt.Sprintf("master %v %v", addr, err)
		}
		repl, err := rc.Info(ctx, "replication").Result()
		return err == nil && strings.Contains(repl, "role:master"), fmt.Sprintf("%v\n%s", err, repl)
	})
	s.Master, s.Replica = s.Replica, s.Master
}

// Rejoin brings the former master back (it resumes a paused one, and
// restarts a stopped one, which comes back believing it is still the
// master) and waits until the sentinel has made it the new master's
// replica, in sync, as it does with a failed master that returns.
func (s *Sentinel) Rejoin() {
	s.t.Helper()
	if s.Replica.paused {
		s.Replica.Resume()
	} else {
		s.Replica.Start()
	}
	sc, rc := s.client(), s.Replica.Client(s.t)
	settle(s.t, s.Replica.Addr+" never rejoined as the replica in sync", func(ctx context.Context) (bool, string) {
		repl, err := rc.Info(ctx, "replication").Result()
		if err != nil || !strings.Contains(repl, "role:slave") || !strings.Contains(repl, "master_link_status:up") {
			return false, fmt.Sprintf("%v\n%s", err, repl)
		}
		replicas, err := sc.Replicas(ctx, s.MasterName).Result()
		return err == nil && len(replicas) == 1 && replicas[0]["ip"]+":"+replicas[0]["port"] == s.Replica.Addr &&
			replicas[0]["master-link-status"] == "ok" && !strings.Contains(replicas[0]["flags"], "down"), fmt.Sprintf("%v %v", err, replicas)
	})
}

// client returns a new client for the sentinel, closed at test end.
func (s *Sentinel) client() *redis.SentinelClient {
	sc := redis.NewSentinelClient(&redis.Options{ContextTimeoutEnabled: true, Addr: s.Addr})
	s.t.Cleanup(func() { _ = sc.Close() })
	return sc
}
