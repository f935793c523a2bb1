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
	conf string // a configuration file, if any (a sentinel's)
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
	var args []string
	if s.conf != "" { // a configuration file comes first
		args = append(args, s.conf)
	}
	args = append(args, "--port", strconv.Itoa(s.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--dir", s.dir, "--protected-mode", "no", "--logfile", filepath.Join(s.dir, "redis.log"))
	args = append(args, s.args...)
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
