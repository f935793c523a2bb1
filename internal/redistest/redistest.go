// Package redistest starts real redis-server processes on free loopback
// ports for tests, and stops them at test end. Without redis-server on the
// PATH a test is skipped with a clear message, except in CI (CI=true),
// where that is a failure.
package redistest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// startTimeout bounds how long a fresh redis-server may take to answer.
const startTimeout = 10 * time.Second

// Require returns the path of binary, skipping (locally) or failing (CI).
func Require(t testing.TB, binary string) string {
	t.Helper()
	path, err := exec.LookPath(binary)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s not found on PATH: CI must install it (.ci/run installs redis-server and redis-tools)", binary)
		}
		t.Skipf("%s not found on PATH: install Redis (e.g. apt-get install redis-server redis-tools) to run this test", binary)
	}
	return path
}

// Server is one redis-server process.
type Server struct {
	Addr string
	port int
	dir  string
	args []string
	cmd  *exec.Cmd
	t    testing.TB
	// paused is set between Pause and Resume (or Stop).
	paused bool
}

// Start runs a redis-server on a free loopback port, stopped at test end.
func Start(t testing.TB, extra ...string) *Server {
	t.Helper()
	Require(t, "redis-server")
	port := freePort(t, false)
	s := &Server{Addr: "127.0.0.1:" + strconv.Itoa(port), port: port, dir: t.TempDir(), t: t, args: extra}
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

// Start (re)starts the process on the same port.
func (s *Server) Start() {
	s.t.Helper()
	args := append([]string{"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--dir", s.dir, "--protected-mode", "no", "--logfile", filepath.Join(s.dir, "redis.log")}, s.args...)
	s.cmd = exec.Command("redis-server", args...)
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("starting redis-server: %v", err)
	}
	waitReady(s.t, s.Addr, s.dir)
}

// Stop kills the process (as a crash would) and waits for it.
func (s *Server) Stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd, s.paused = nil, false
}

// Pause stops the process (SIGSTOP) with its connections open: a stalled
// Redis, which still accepts connections and answers nothing, until Resume.
func (s *Server) Pause() { s.signal(syscall.SIGSTOP); s.paused = true }

// Resume continues a paused process (SIGCONT).
func (s *Server) Resume() { s.signal(syscall.SIGCONT); s.paused = false }

// answers reports whether the process runs and is not paused.
func (s *Server) answers() bool { return s.cmd != nil && !s.paused }

func (s *Server) signal(sig os.Signal) {
	s.t.Helper()
	if s.cmd == nil || s.cmd.Process == nil {
		s.t.Fatalf("redis-server at %s is not running", s.Addr)
	}
	if err := s.cmd.Process.Signal(sig); err != nil {
		s.t.Fatalf("signalling redis-server: %v", err)
	}
}

// Client returns a new client for the server, closed at test end.
func (s *Server) Client(t testing.TB) *redis.Client {
	c := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: s.Addr, MaxRetries: -1, DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// Cluster is a Redis Cluster: masters, each with the same number of
// replicas.
type Cluster struct {
	Addrs []string
	nodes []*Server
	t     testing.TB
}

// clusterNodeTimeout is the nodes' cluster-node-timeout: how long a node
// goes unanswered before the others judge it failed, and its replica, if
// it has one, takes over. Redis's default (15 s) would make a test wait
// that long for a failover.
const clusterNodeTimeout = 2 * time.Second

// clusterReadyTimeout bounds how long a new cluster, or one failing over,
// may take to agree on its state.
const clusterReadyTimeout = 30 * time.Second

// StartCluster runs masters*(1+replicas) nodes with --cluster-enabled,
// joins them with redis-cli --cluster create (masters of their slots
// first, replicas after), and waits until every node finds the cluster
// ok and every replica has its master's data.
func StartCluster(t testing.TB, masters, replicas int) *Cluster {
	t.Helper()
	Require(t, "redis-server")
	cli := Require(t, "redis-cli")
	c := &Cluster{t: t}
	for range masters * (1 + replicas) {
		port := freePort(t, true)
		dir := t.TempDir()
		s := &Server{Addr: "127.0.0.1:" + strconv.Itoa(port), port: port, dir: dir, t: t,
			args: []string{"--cluster-enabled", "yes", "--cluster-config-file", filepath.Join(dir, "nodes.conf"),
				"--cluster-node-timeout", strconv.Itoa(int(clusterNodeTimeout / time.Millisecond))}}
		s.Start()
		t.Cleanup(s.Stop)
		c.nodes = append(c.nodes, s)
		c.Addrs = append(c.Addrs, s.Addr)
	}
	args := append([]string{"--cluster", "create"}, c.Addrs...)
	args = append(args, "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	out, err := exec.Command(cli, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	c.waitOK(c.nodes)
	return c
}

// waitOK waits until each of nodes finds the cluster ok and, if it is a
// replica, is in sync with its master.
func (c *Cluster) waitOK(nodes []*Server) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), clusterReadyTimeout)
	defer cancel()
	for _, s := range nodes {
		cl := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: s.Addr})
		for {
			info, err := cl.ClusterInfo(ctx).Result()
			repl, rerr := cl.Info(ctx, "replication").Result()
			if err == nil && rerr == nil && strings.Contains(info, "cluster_state:ok") &&
				(strings.Contains(repl, "role:master") || strings.Contains(repl, "master_link_status:up")) {
				break
			}
			if ctx.Err() != nil {
				_ = cl.Close()
				c.t.Fatalf("cluster node %s never became ok: %v %v\n%s\n%s", s.Addr, err, rerr, info, repl)
			}
			time.Sleep(50 * time.Millisecond)
		}
		_ = cl.Close()
	}
}

// waitAnsweringOK is waitOK on every node that answers.
func (c *Cluster) waitAnsweringOK() {
	c.t.Helper()
	var answering []*Server
	for _, s := range c.nodes {
		if s.answers() {
			answering = append(answering, s)
		}
	}
	c.waitOK(answering)
}

// MasterOf returns the node that serves key's slot as its master, as a
// node that answers sees it.
func (c *Cluster) MasterOf(key string) *Server {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	var slot int64
	addr := c.ask(func(cl *redis.Client) (err error) {
		slot, err = cl.ClusterKeySlot(ctx, key).Result()
		return err
	})
	if addr == "" {
		c.t.Fatalf("no node of the cluster answers")
	}
	for _, r := range c.slots() {
		if int64(r.Start) <= slot && slot <= int64(r.End) && len(r.Nodes) > 0 {
			return c.node(r.Nodes[0].Addr)
		}
	}
	c.t.Fatalf("no master serves %q's slot %d", key, slot)
	return nil
}

// Masters returns the nodes that serve slots as masters, as a node that
// answers sees it, in the order of their first slots.
func (c *Cluster) Masters() []*Server {
	c.t.Helper()
	var masters []*Server
	for _, r := range c.slots() {
		if len(r.Nodes) > 0 && !slices.Contains(masters, c.node(r.Nodes[0].Addr)) {
			masters = append(masters, c.node(r.Nodes[0].Addr))
		}
	}
	return masters
}

// WaitFailover waits until a replica serves every slot master served (a
// master the test stopped or paused) and every node that answers finds
// the cluster ok again.
func (c *Cluster) WaitFailover(master *Server) {
	c.t.Helper()
	deadline := time.Now().Add(clusterReadyTimeout)
	for slices.ContainsFunc(c.slots(), func(r redis.ClusterSlot) bool { return len(r.Nodes) == 0 || r.Nodes[0].Addr == master.Addr }) {
		if time.Now().After(deadline) {
			c.t.Fatalf("no replica took over the slots of %s within %s", master.Addr, clusterReadyTimeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.waitAnsweringOK()
}

// Rejoin restarts node, a master that failed over, and waits until it
// serves as a replica of the master that took its place, in sync with it,
// and every node that answers finds the cluster ok.
func (c *Cluster) Rejoin(node *Server) {
	c.t.Helper()
	if node.paused {
		node.Stop()
	}
	node.Start()
	cl := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: node.Addr})
	defer cl.Close()
	deadline := time.Now().Add(clusterReadyTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		repl, err := cl.Info(ctx, "replication").Result()
		cancel()
		if err == nil && strings.Contains(repl, "role:slave") && strings.Contains(repl, "master_link_status:up") {
			break
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s never rejoined as a replica in sync: %v\n%s", node.Addr, err, repl)
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.waitAnsweringOK()
}

// slots is the cluster's map of slots, as the first node that answers
// sees it: CLUSTER SLOTS, as go-redis's Cluster client reads it.
func (c *Cluster) slots() []redis.ClusterSlot {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	var slots []redis.ClusterSlot
	if c.ask(func(cl *redis.Client) (err error) {
		//lint:ignore SA1019 CLUSTER SLOTS is the map go-redis's Cluster client reads, and Redis before 7.0 has no CLUSTER SHARDS
		slots, err = cl.ClusterSlots(ctx).Result()
		return err
	}) == "" {
		c.t.Fatalf("no node of the cluster answers")
	}
	return slots
}

// ask runs fn on a client of each node that answers in turn until it
// succeeds, and returns that node's address ("" if none did).
func (c *Cluster) ask(fn func(*redis.Client) error) string {
	for _, s := range c.nodes {
		if !s.answers() {
			continue
		}
		cl := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: s.Addr, MaxRetries: -1})
		err := fn(cl)
		_ = cl.Close()
		if err == nil {
			return s.Addr
		}
	}
	return ""
}

// node is the cluster's node at addr.
func (c *Cluster) node(addr string) *Server {
	c.t.Helper()
	for _, s := range c.nodes {
		if s.Addr == addr {
			return s
		}
	}
	c.t.Fatalf("%s is no node of the cluster", addr)
	return nil
}

// Client returns a new cluster client, closed at test end.
func (c *Cluster) Client(t testing.TB) *redis.ClusterClient {
	cl := redis.NewClusterClient(&redis.ClusterOptions{ContextTimeoutEnabled: true, Addrs: c.Addrs, DialTimeout: time.Second})
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}

// freePort finds a free loopback port (and, for cluster nodes, port+10000
// for the cluster bus).
func freePort(t testing.TB, bus bool) int {
	t.Helper()
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("no free port: %v", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		_ = l.Close()
		if !bus {
			return port
		}
		if port+10000 > 65535 {
			continue
		}
		if lb, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port+10000)); err == nil {
			_ = lb.Close()
			return port
		}
	}
	t.Fatalf("no free port pair for a cluster node")
	return 0
}

func waitReady(t testing.TB, addr, dir string) {
	t.Helper()
	c := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: addr, MaxRetries: -1})
	defer c.Close()
	deadline := time.Now().Add(startTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		err := c.Ping(ctx).Err()
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "redis.log"))
			t.Fatalf("redis-server at %s not ready: %v\n%s", addr, err, bytes.TrimSpace(log))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// String names the server in test output.
func (s *Server) String() string { return fmt.Sprintf("redis-server(%s)", s.Addr) }
