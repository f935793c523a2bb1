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
	s.cmd = nil
}

// Pause stops the process (SIGSTOP) with its connections open: a stalled
// Redis, which still accepts connections and answers nothing, until Resume.
func (s *Server) Pause() { s.signal(syscall.SIGSTOP) }

// Resume continues a paused process (SIGCONT).
func (s *Server) Resume() { s.signal(syscall.SIGCONT) }

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

// Cluster is a Redis Cluster of masters with no replicas.
type Cluster struct {
	Addrs []string
	nodes []*Server
}

// StartCluster runs n masters with --cluster-enabled and joins them with
// redis-cli --cluster create.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	Require(t, "redis-server")
	cli := Require(t, "redis-cli")
	c := &Cluster{}
	for range n {
		port := freePort(t, true)
		dir := t.TempDir()
		s := &Server{Addr: "127.0.0.1:" + strconv.Itoa(port), port: port, dir: dir, t: t,
			args: []string{"--cluster-enabled", "yes", "--cluster-config-file", filepath.Join(dir, "nodes.conf"), "--cluster-node-timeout", "2000"}}
		s.Start()
		t.Cleanup(s.Stop)
		c.nodes = append(c.nodes, s)
		c.Addrs = append(c.Addrs, s.Addr)
	}
	args := append([]string{"--cluster", "create"}, c.Addrs...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	out, err := exec.Command(cli, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, addr := range c.Addrs { // wait until every node agrees the cluster is ok
		cl := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: addr})
		for {
			info, err := cl.ClusterInfo(ctx).Result()
			if err == nil && strings.Contains(info, "cluster_state:ok") {
				break
			}
			if ctx.Err() != nil {
				_ = cl.Close()
				t.Fatalf("cluster at %s never became ok: %v %s", addr, err, info)
			}
			time.Sleep(50 * time.Millisecond)
		}
		_ = cl.Close()
	}
	return c
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
