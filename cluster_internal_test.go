package sandboxpool

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// clusterNodes is CLUSTER NODES as Redis 7 prints it: masters :30001 to
// :30003 and their replicas :30004 to :30006 (hostnames announced too).
const clusterNodes = `07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002,host2 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003,host3 master - 0 1426238318243 3 connected 10923-16383
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005,host5 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 connected
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 127.0.0.1:30006@31006,host6 slave 292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 0 1426238317741 6 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001,host1 myself,master - 0 0 1 connected 0-5460
`

// A master is judged lost when the Cluster flags it fail (not merely
// fail?, one node's suspicion) and none of its replicas can take over:
// each is flagged fail or fail?, or nofailover, or there is none.
func TestParseFailedMasters(t *testing.T) {
	set := func(text, port, flags string) string {
		var out []string
		for line := range strings.Lines(text) {
			f := strings.Fields(line)
			if strings.HasPrefix(f[1], "127.0.0.1:"+port+"@") {
				f[2] = flags
			}
			out = append(out, strings.Join(f, " "))
		}
		return strings.Join(out, "\n")
	}
	drop := func(text, port string) string {
		var out []string
		for line := range strings.Lines(text) {
			if !strings.Contains(line, "127.0.0.1:"+port+"@") {
				out = append(out, strings.TrimRight(line, "\n"))
			}
		}
		return strings.Join(out, "\n")
	}
	masterFailed := set(clusterNodes, "30003", "master,fail")
	for _, c := range []struct {
		name, text string
		want       []string
	}{
		{"all well", clusterNodes, nil},
		{"nothing read", "", nil},
		{"not CLUSTER NODES", "ERR This instance has cluster support disabled\n", nil},
		{"a master failed, its replica takes over", masterFailed, nil},
		{"a master with no replica suspected by one node", drop(set(clusterNodes, "30003", "master,fail?"), "30006"), nil},
		{"a master failed with no replica", drop(masterFailed, "30006"), []string{"127.0.0.1:30003"}},
		{"a master failed and its replica too", set(masterFailed, "30006", "slave,fail"), []string{"127.0.0.1:30003"}},
		{"a master failed and its replica suspected", set(masterFailed, "30006", "slave,fail?"), []string{"127.0.0.1:30003"}},
		{"a master failed and its replica may not take over", set(masterFailed, "30006", "slave,nofailover"), []string{"127.0.0.1:30003"}},
		{"a replica failed", set(clusterNodes, "30006", "slave,fail"), nil},
		{"the node read is the failed master's replica", set(set(masterFailed, "30006", "myself,slave"), "30001", "master"), nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := parseFailedMasters(c.text)
			assert.Len(t, got, len(c.want))
			for _, addr := range c.want {
				assert.True(t, got[addr], addr)
			}
		})
	}
}

// Whatever a node answers, parsing it never panics, and every master it
// names as lost is one its text flags fail.
func FuzzParseFailedMasters(f *testing.F) {
	f.Add(clusterNodes)
	f.Add(strings.Replace(clusterNodes, "myself,master", "master,fail", 1))
	f.Add("a b master,fail -\n")
	f.Add("")
	f.Fuzz(func(t *testing.T, text string) {
		for addr := range parseFailedMasters(text) {
			if !strings.Contains(text, addr) || !strings.Contains(text, "fail") {
				t.Fatalf("%q named lost, not flagged fail in %q", addr, text)
			}
		}
	})
}

// A create goes without the lock when any key it needs lives on a lost
// master: its record and lock, its user's quota set (which the user's rate
// shares a slot with) if MaxPerUser or CreateLimit is set, and the set of
// all pairs if MaxSandboxes is. A key it does not need, or a client that
// is no Cluster's, never makes it.
func TestKeysLostAsksForEveryKeyACreateNeeds(t *testing.T) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr()})
	defer rdb.Close()
	k := pairKey{"alice", "demo"}
	ctx := context.Background()
	for _, c := range []struct {
		name string
		cfg  func(*Config)
		lost string // the key on the lost master
		want bool
	}{
		{"its record", func(*Config) {}, "sandboxpool:{alice:demo}:sbx", true},
		{"its user's set, not asked for", func(*Config) {}, "sandboxpool:{alice}:live", false},
		{"its user's set, with MaxPerUser", func(c *Config) { c.MaxPerUser = 2 }, "sandboxpool:{alice}:live", true},
		{"its user's rate, with CreateLimit", func(c *Config) { c.CreateLimit = RateLimit{Rate: 1, Per: time.Second} }, "sandboxpool:{alice}:live", true},
		{"the set of all, not asked for", func(c *Config) { c.MaxPerUser = 2 }, "sandboxpool:live", false},
		{"the set of all, with MaxSandboxes", func(c *Config) { c.MaxSandboxes = 10 }, "sandboxpool:live", true},
		{"another pair's record", func(c *Config) { c.MaxPerUser, c.MaxSandboxes = 2, 10 }, "sandboxpool:{bob:demo}:sbx", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			cluster := newLostMaster(t, rdb, c.lost)
			cfg := Config{Redis: cluster}
			c.cfg(&cfg)
			cfg = cfg.withDefaults()
			m := &Manager{cfg: cfg, log: slog.New(slog.DiscardHandler), store: newStore(cfg, slog.New(slog.DiscardHandler), new(atomic.Int64))}
			// What the Cluster said a moment ago: no read is due.
			m.store.judged.at, m.store.judged.failed = time.Now(), map[string]bool{"lost:6379": true}
			assert.Equal(t, c.want, m.keysLost(ctx, k))
			assert.Zero(t, cluster.reads.Load(), "the Cluster's word a moment ago was read again")

			m.store.judged.at = time.Now().Add(-judgedEvery) // due: read, and now no master failed
			assert.False(t, m.keysLost(ctx, k))
			assert.EqualValues(t, 1, cluster.reads.Load())
		})
	}
	m := &Manager{cfg: Config{Redis: rdb}.withDefaults(), log: slog.New(slog.DiscardHandler)}
	m.store = newStore(m.cfg, m.log, new(atomic.Int64))
	assert.False(t, m.keysLost(ctx, k), "a client that is no Cluster's")
}

// A create whose Redis calls go unanswered, on a master the Cluster has
// judged lost, goes without the lock at once (counted in
// DegradedCreates), or with RefuseCreatesWhenDegraded is refused with
// ErrUnavailable; the breaker stays closed throughout, as the other
// masters' answers keep it. (Here nothing listens where the client dials,
// and RedisTimeout is long, so that silence alone would not open the
// breaker during the test.) Before, the create tried again until its
// caller gave up.
func TestCreateOnALostMasterGoesWithoutTheLockOrIsRefused(t *testing.T) {
	for _, refuse := range []bool{false, true} {
		t.Run(fmt.Sprint("RefuseCreatesWhenDegraded=", refuse), func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(t, err)
			addr := ln.Addr().String()
			require.NoError(t, ln.Close()) // a lost master: the dial is refused
			rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: addr, MaxRetries: -1})
			defer rdb.Close()
			k := pairKey{"u", "p"}
			m, err := New(Config{Provider: stubProvider{}, Redis: newLostMaster(t, rdb, k.redisKey(DefaultNamespace, "sbx")),
				RedisTimeout: time.Minute, RefuseCreatesWhenDegraded: refuse, probeInterval: time.Hour})
			require.NoError(t, err)
			defer m.Close(context.Background())
			j := &m.store.judged
			j.mu.Lock()
			j.at, j.failed = time.Now().Add(time.Hour), map[string]bool{"lost:6379": true} // the Cluster's word, standing for the test
			j.mu.Unlock()

			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			l, err := m.Acquire(ctx, k.user, k.project)
			st := m.Stats()
			if refuse {
				require.ErrorIs(t, err, ErrUnavailable)
				assert.Zero(t, st.DegradedCreates)
			} else {
				require.NoError(t, err)
				l.Release()
				assert.EqualValues(t, 1, st.DegradedCreates)
			}
			assert.False(t, st.RedisDegraded, "the breaker opened")
		})
	}
}

// lostMaster is a Cluster client whose master "lost:6379" serves lostKey's
// slot (every key with its hash tag) and "well:6379" every other key. Asked to reach every master, it reaches
// none: a read of the Cluster's word names no failed master.
type lostMaster struct {
	redis.UniversalClient
	lostKey    string
	lost, well *redis.Client // dial nothing: only their addresses are asked for
	reads      atomic.Int64
}

func newLostMaster(t *testing.T, rdb redis.UniversalClient, lostKey string) *lostMaster {
	c := &lostMaster{UniversalClient: rdb, lostKey: lostKey,
		lost: redis.NewClient(&redis.Options{Addr: "lost:6379"}), well: redis.NewClient(&redis.Options{Addr: "well:6379"})}
	t.Cleanup(func() { _, _ = c.lost.Close(), c.well.Close() })
	return c
}

func (c *lostMaster) MasterForKey(_ context.Context, key string) (*redis.Client, error) {
	if hashTag(key) == hashTag(c.lostKey) {
		return c.lost, nil
	}
	return c.well, nil
}

func (c *lostMaster) ForEachMaster(context.Context, func(context.Context, *redis.Client) error) error {
	c.reads.Add(1)
	return nil
}

// hashTag is the part of key that Redis Cluster hashes to find its slot:
// the first {...} that holds something, or else the whole key.
func hashTag(key string) string {
	if _, rest, ok := strings.Cut(key, "{"); ok {
		if tag, _, ok := strings.Cut(rest, "}"); ok && tag != "" {
			return tag
		}
	}
	return key
}
