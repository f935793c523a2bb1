package sandboxpool

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
	"golang.org/x/sync/singleflight"
)

// topology is a Redis client that routes each key to the node serving its
// slot, from a map of the cluster it can be told to read again:
// *redis.ClusterClient.
type topology interface{ ReloadState(ctx context.Context) }

// nodeLost has a Cluster client read the cluster's map again after a call
// that Redis did not answer (the node refused the connection, or did not
// reply in time), and after the removal subscription lost its connection.
// go-redis reads the map again on a MOVED reply, and otherwise only every
// ClusterStateReloadInterval (a minute by default), not when the node it
// routes a slot to is gone (redis/go-redis#3979). So after a master failed
// over to its replica, every call of its slots went on failing for up to
// that minute, the other masters' answers kept the breaker closed, a
// create of a pair there tried again until its caller gave up, and the
// subscription redialled the dead master
// (TestRealRedisClusterFailoverIsCarriedByTheReplica). go-redis reads the
// map on a goroutine of its own, one read at a time and at most one every
// 200 ms, so a burst of failures costs a few CLUSTER SLOTS. A call the
// breaker refused never reached a node.
func (st *store) nodeLost(ctx context.Context, err error) {
	if st.nodes == nil || isRedisError(err) || errors.Is(err, gobreaker.ErrOpenState) || errors.Is(err, gobreaker.ErrTooManyRequests) {
		return
	}
	st.nodes.ReloadState(ctx)
}

// masters is a Redis client that can name the master serving a key and
// reach every master: *redis.ClusterClient.
type masters interface {
	MasterForKey(ctx context.Context, key string) (*redis.Client, error)
	ForEachMaster(ctx context.Context, fn func(ctx context.Context, client *redis.Client) error) error
}

// judgedEvery is how long a Manager goes by what a Cluster last said of
// its failed masters (see failedMasters). A create of a pair on a failed
// master's slots tries again every redisRetry; asking every master once a
// second instead costs each master one CLUSTER NODES a second, and only
// while such creates fail.
const judgedEvery = time.Second

// judgment is what a Cluster last said of its failed masters.
type judgment struct {
	reads  singleflight.Group // one read at a time
	mu     sync.Mutex
	at     time.Time       // when it was read; zero if never
	failed map[string]bool // guarded by mu
	// warned is set once a create has said it goes without the lock
	// because a master failed, and cleared when the Cluster names no
	// failed master: one Warn for an episode, not one per pair.
	warned bool // guarded by mu
}

// keysLost reports whether a key k's create needs (its record and lock,
// and its quota sets and its user's rate, if any) lives on a master that
// the Cluster has judged failed and that no replica can take the place
// of: a Cluster without replicas, or whose replicas failed too, that
// serves the other masters' slots (cluster-require-full-coverage no).
// Those keys are gone until the master returns, and the other masters go
// on answering, so the breaker stays closed: before, a create of a pair
// there tried again until its caller gave up, as many pairs as that
// master served slots (a third of the new pairs, with three masters)
// failed for as long as it was down, and with quotas every create did if
// the master held the global set. Now such a create goes without the lock
// (or is refused, with RefuseCreatesWhenDegraded), as every create does
// when all of Redis is out, and is published once the master is back
// (TestRealRedisClusterMasterLostWithoutAReplicaServesItsPairs). The
// Cluster's own word, a majority of its masters marking the node fail
// after cluster-node-timeout, tells a master that is gone from calls
// timed out on this side (a busy host), and from one whose replica is
// about to take over, for which the create waits. A Cluster that
// announces hostnames instead of addresses is never judged here.
func (m *Manager) keysLost(ctx context.Context, k pairKey) bool {
	if m.store.cluster == nil {
		return false
	}
	failed := m.store.failedMasters(ctx)
	if len(failed) == 0 {
		return false
	}
	sets, _ := m.quotaSets(k)
	keys := append([]string{m.store.sbxKey(k)}, sets...)
	if m.cfg.CreateLimit.enabled() {
		keys = append(keys, m.store.rateKey(k.user))
	}
	for _, key := range keys {
		if c, err := m.store.cluster.MasterForKey(ctx, key); err == nil && failed[c.Options().Addr] {
			m.warnLost(ctx, key, c.Options().Addr)
			return true
		}
	}
	return false
}

// warnLost logs the first create of an episode that goes without the lock
// because the master holding key failed.
func (m *Manager) warnLost(ctx context.Context, key, addr string) {
	j := &m.store.judged
	j.mu.Lock()
	first := !j.warned
	j.warned = true
	j.mu.Unlock()
	if first {
		m.log.LogAttrs(ctx, slogWarn, "sandboxpool: a Redis Cluster master failed with no replica to take its place: creating its pairs without the lock until it is back",
			slog.String("master", addr), slog.String("key", key))
	}
}

// failedMasters returns the addresses of the masters the Cluster has
// judged failed with no replica to take their place, as the first master
// to answer CLUSTER NODES said at most judgedEvery ago. It reads again on
// one goroutine at a time, within RedisTimeout; a read no master answered
// names none. go-redis reads its map of the Cluster first, from the nodes
// in random order, so a hung master can take a read's RedisTimeout: that
// read names none, and the next, a second later, tries again.
func (st *store) failedMasters(ctx context.Context) map[string]bool {
	j := &st.judged
	j.mu.Lock()
	if !j.at.IsZero() && time.Since(j.at) < judgedEvery {
		defer j.mu.Unlock()
		return j.failed
	}
	j.mu.Unlock()
	v, _, _ := j.reads.Do("", func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), st.timeout)
		defer cancel()
		var (
			mu    sync.Mutex
			nodes string
		)
		_ = st.cluster.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
			text, err := c.ClusterNodes(ctx).Result()
			if err == nil {
				mu.Lock()
				if nodes == "" {
					nodes = text
				}
				mu.Unlock()
			}
			return err
		})
		failed := parseFailedMasters(nodes)
		j.mu.Lock()
		j.at, j.failed = time.Now(), failed
		if len(failed) == 0 {
			j.warned = false
		}
		j.mu.Unlock()
		return failed, nil
	})
	return v.(map[string]bool)
}

// parseFailedMasters reads CLUSTER NODES: one line per node, "<id>
// <ip:port@cport[,hostname]> <flags> <master id or -> ..." with flags
// such as master, slave, fail? (this node suspects it) and fail (a
// majority of masters agreed). It returns the addresses of the masters
// flagged fail none of whose replicas can take over: a replica can if it
// is not flagged fail, fail? or nofailover.
func parseFailedMasters(text string) map[string]bool {
	type node struct {
		addr, master  string
		flags         []string
		isMaster, bad bool
	}
	var nodes []node
	byID := map[string]int{}
	for line := range strings.Lines(text) {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		addr, _, _ := strings.Cut(f[1], "@")
		flags := strings.Split(f[2], ",")
		byID[f[0]] = len(nodes)
		nodes = append(nodes, node{addr: addr, master: f[3], flags: flags, isMaster: slices.Contains(flags, "master"),
			bad: slices.Contains(flags, "fail") || slices.Contains(flags, "fail?")})
	}
	failed := map[string]bool{}
	for _, n := range nodes {
		if n.isMaster && slices.Contains(n.flags, "fail") {
			failed[n.addr] = true
		}
	}
	for _, n := range nodes {
		if i, ok := byID[n.master]; ok && !n.isMaster && !n.bad && !slices.Contains(n.flags, "nofailover") {
			delete(failed, nodes[i].addr)
		}
	}
	return failed
}
