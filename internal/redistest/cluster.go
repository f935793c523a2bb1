package redistest

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

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

// settleTimeout bounds how long a new cluster or sentinel's group, or one
// failing over, may take to settle.
const settleTimeout = 30 * time.Second

// settle polls ok, each try within a second, every 20 ms until it reports
// true, and fails the test with failure and the state ok reported last if
// that takes longer than settleTimeout.
func settle(t testing.TB, failure string, ok func(ctx context.Context) (done bool, state string)) {
	t.Helper()
	deadline := time.Now().Add(settleTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		done, state := ok(ctx)
		cancel()
		if done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s within %s: %s", failure, settleTimeout, state)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// StartCluster runs masters*(1+replicas) nodes with --cluster-enabled
// and args, joins them with redis-cli --cluster create (masters of their
// slots first, replicas after), and waits until every node finds the
// cluster ok and every replica has its master's data.
func StartCluster(t testing.TB, masters, replicas int, args ...string) *Cluster {
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
		s.args = append(s.args, args...)
		s.Start()
		t.Cleanup(s.Stop)
		c.nodes = append(c.nodes, s)
		c.Addrs = append(c.Addrs, s.Addr)
	}
	create := append([]string{"--cluster", "create"}, c.Addrs...)
	create = append(create, "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	out, err := exec.Command(cli, create...).CombinedOutput()
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
	for _, s := range nodes {
		cl := s.Client(c.t)
		settle(c.t, "cluster node "+s.Addr+" never became ok", func(ctx context.Context) (bool, string) {
			info, err := cl.ClusterInfo(ctx).Result()
			repl, rerr := cl.Info(ctx, "replication").Result()
			inSync := strings.Contains(repl, "role:master") || strings.Contains(repl, "master_link_status:up")
			return err == nil && rerr == nil && strings.Contains(info, "cluster_state:ok") && inSync,
				fmt.Sprintf("%v %v\n%s\n%s", err, rerr, info, repl)
		})
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
	settle(c.t, "no replica took over the slots of "+master.Addr, func(context.Context) (bool, string) {
		return !slices.ContainsFunc(c.slots(), func(r redis.ClusterSlot) bool { return len(r.Nodes) == 0 || r.Nodes[0].Addr == master.Addr }), ""
	})
	c.waitAnsweringOK()
}

// Rejoin restarts node, a master the test stopped and that failed over,
// and waits until it serves as a replica of the master that took its
// place, in sync with it, and every node that answers finds the cluster
// ok.
func (c *Cluster) Rejoin(node *Server) {
	c.t.Helper()
	node.Start()
	cl := node.Client(c.t)
	settle(c.t, node.Addr+" never rejoined as a replica in sync", func(ctx context.Context) (bool, string) {
		repl, err := cl.Info(ctx, "replication").Result()
		return err == nil && strings.Contains(repl, "role:slave") && strings.Contains(repl, "master_link_status:up"),
			fmt.Sprintf("%v\n%s", err, repl)
	})
	c.waitAnsweringOK()
}

// WaitFailed waits until the nodes that answer agree that node, which the
// test stopped or paused, has failed (its flags in CLUSTER NODES hold
// fail: a majority of masters judged it so).
func (c *Cluster) WaitFailed(node *Server) {
	c.t.Helper()
	var answering []*redis.Client
	for _, s := range c.nodes {
		if s.answers() {
			answering = append(answering, s.Client(c.t))
		}
	}
	settle(c.t, "the cluster never judged "+node.Addr+" failed", func(ctx context.Context) (bool, string) {
		for _, cl := range answering {
			nodes, err := cl.ClusterNodes(ctx).Result()
			if err != nil || !flagged(nodes, node.Addr, "fail") {
				return false, fmt.Sprintf("%s: %v\n%s", cl.Options().Addr, err, nodes)
			}
		}
		return true, ""
	})
}

// flagged reports whether the line of CLUSTER NODES for addr holds flag.
func flagged(nodes, addr, flag string) bool {
	for line := range strings.Lines(nodes) {
		if f := strings.Fields(line); len(f) > 2 && strings.HasPrefix(f[1], addr+"@") {
			return slices.Contains(strings.Split(f[2], ","), flag)
		}
	}
	return false
}

// Return brings back node, a master the test stopped or paused that no
// replica replaced: it resumes a paused one, and restarts a stopped one
// with its slots and none of its keys (as a crash without persistence
// leaves it); then it waits until every node finds the cluster ok.
func (c *Cluster) Return(node *Server) {
	c.t.Helper()
	if node.paused {
		node.Resume()
	} else {
		node.Start()
	}
	c.waitOK(c.nodes)
}

// Reshard starts moving n slots, and the keys in them, from one master to
// another with redis-cli --cluster reshard, and returns a function that
// waits until the move is done and checks that to serves n slots more.
func (c *Cluster) Reshard(from, to *Server, n int) (wait func()) {
	c.t.Helper()
	before := c.slotsOf(to)
	cmd := exec.Command(Require(c.t, "redis-cli"), "--cluster", "reshard", from.Addr,
		"--cluster-from", c.id(from), "--cluster-to", c.id(to), "--cluster-slots", strconv.Itoa(n), "--cluster-yes")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		c.t.Fatalf("redis-cli --cluster reshard: %v", err)
	}
	return func() {
		c.t.Helper()
		if err := cmd.Wait(); err != nil {
			c.t.Fatalf("redis-cli --cluster reshard: %v\n%s", err, out.Bytes())
		}
		if got := c.slotsOf(to); got != before+n {
			c.t.Fatalf("%s serves %d slots after the move, %d expected", to.Addr, got, before+n)
		}
	}
}

// id is node's id in the cluster.
func (c *Cluster) id(node *Server) string {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	id, err := node.Client(c.t).ClusterMyID(ctx).Result()
	if err != nil {
		c.t.Fatalf("CLUSTER MYID on %s: %v", node.Addr, err)
	}
	return id
}

// slotsOf is how many slots master serves.
func (c *Cluster) slotsOf(master *Server) int {
	c.t.Helper()
	n := 0
	for _, r := range c.slots() {
		if len(r.Nodes) > 0 && r.Nodes[0].Addr == master.Addr {
			n += r.End - r.Start + 1
		}
	}
	return n
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
