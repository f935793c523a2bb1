package sandboxpool

import (
	"context"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// How each write treats a pair's quota place that is there already. A
// keepalive (refreshReservation) moves it forward only: a deadline earlier
// than the one a set holds leaves it, a later one moves it, and the set's
// expiry with it. A reservation leaves it, whether its own provisional
// expiry ends earlier or later: the create may be a lock waiter that will
// take the sandbox the holder publishes. The publisher (settleReservation)
// sets it, earlier or later. The scripts compare the scores themselves
// (ZADD GT needs Redis 6.2), so this is theirs to get right.
func TestQuotaPlaceWrites(t *testing.T) {
	m, mr, rdb := newQuotaManager(t, func(cfg *Config) { cfg.CreateTimeout = time.Hour })
	ctx, k := context.Background(), pairKey{"u", "p"}
	sets := []string{m.store.userLiveKey("u"), m.store.liveKey()}
	at := func(d time.Duration) int64 { return time.Now().Add(d).UnixNano() }
	placed := func(ns int64) []float64 { return []float64{float64(nsToMs(ns)), float64(nsToMs(ns))} }
	scores := func() []float64 {
		var s []float64
		for _, set := range sets {
			score, err := rdb.ZScore(ctx, set, pairMember(k)).Result()
			require.NoError(t, err, set)
			s = append(s, score)
		}
		return s
	}
	expireIn := func(want time.Duration, msg string) {
		for _, set := range sets {
			assert.InDelta(t, float64(want), float64(mr.TTL(set)), float64(time.Minute), "%s: %s", set, msg)
		}
	}

	far := at(2 * time.Hour)
	m.refreshReservation(ctx, k, far) // a pair not in the sets is added
	require.Equal(t, placed(far), scores())
	m.refreshReservation(ctx, k, at(time.Hour))
	assert.Equal(t, placed(far), scores(), "a keepalive's earlier deadline leaves the place as it was")
	later := at(3 * time.Hour)
	m.refreshReservation(ctx, k, later)
	assert.Equal(t, placed(later), scores(), "a later one moves it")
	expireIn(3*time.Hour, "and the set's expiry with it")

	require.NoError(t, m.reserveRemote(ctx, k, &coordination{}))
	assert.Equal(t, placed(later), scores(), "a reservation ending earlier leaves it")
	soon := at(10 * time.Minute)
	m.settleReservation(ctx, k, soon)
	assert.Equal(t, placed(soon), scores(), "the publisher sets it, earlier too")
	expireIn(10*time.Minute, "and the set's expiry with it")
	require.NoError(t, m.reserveRemote(ctx, k, &coordination{}))
	assert.Equal(t, placed(soon), scores(), "a reservation ending later (CreateTimeout, an hour) leaves it too")
}

// redisFloor is the oldest Redis the package's scripts must run on.
var redisFloor = redisRelease{4, 0}

// redisRelease is a Redis release, major and minor.
type redisRelease [2]int

func (r redisRelease) after(o redisRelease) bool {
	return r[0] > o[0] || r[0] == o[0] && r[1] > o[1]
}

func (r redisRelease) String() string { return fmt.Sprintf("%d.%d", r[0], r[1]) }

// scriptSince is every command the package's Lua scripts call, with the
// Redis release that brought it in the form they call it: a command not
// listed fails TestScriptsNeedNothingNewerThanRedis4 until it is added with
// its release, read off the command's page at redis.io. Managed Redis lags
// the releases (Azure Cache for Redis's "6" is 6.0), and a script a server
// refuses fails every call that needs it.
var scriptSince = map[string]redisRelease{
	"del":              {1, 0},
	"get":              {1, 0},
	"hget":             {2, 0},
	"hmget":            {2, 0},
	"hset":             {4, 0}, // with several fields
	"pexpireat":        {2, 6},
	"zadd":             {1, 2},
	"zcard":            {1, 2},
	"zrange":           {1, 2},
	"zrem":             {1, 2},
	"zremrangebyscore": {1, 2},
	"zscore":           {1, 2},
}

// newerOptions are options of those commands that came after redisFloor,
// with the release that brought them.
var newerOptions = map[string]map[string]redisRelease{
	"zadd":      {"GT": {6, 2}, "LT": {6, 2}},
	"pexpireat": {"NX": {7, 0}, "XX": {7, 0}, "GT": {7, 0}, "LT": {7, 0}},
	"zrange":    {"BYSCORE": {6, 2}, "BYLEX": {6, 2}, "REV": {6, 2}, "LIMIT": {6, 2}},
}

// The package's Lua scripts call nothing newer than Redis 4.0: no command
// and no option a server that old refuses. Before, the quota scripts used
// ZADD GT (6.2), and every create with MaxSandboxes or MaxPerUser set
// failed on Redis 6.0.
func TestScriptsNeedNothingNewerThanRedis4(t *testing.T) {
	files, err := filepath.Glob("*.go")
	require.NoError(t, err)
	fset := token.NewFileSet()
	scripts := map[string]string{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, 0)
		require.NoError(t, err)
		ast.Inspect(file, func(n ast.Node) bool {
			vs, ok := n.(*ast.ValueSpec)
			if !ok {
				return true
			}
			for i, v := range vs.Values {
				call, ok := v.(*ast.CallExpr)
				if !ok || len(call.Args) != 1 {
					continue
				}
				if sel, ok := call.Fun.(*ast.SelectorExpr); !ok || sel.Sel.Name != "NewScript" {
					continue
				}
				lit, ok := call.Args[0].(*ast.BasicLit)
				require.True(t, ok, "%s: %s's script is not a literal", f, vs.Names[i].Name)
				src, err := strconv.Unquote(lit.Value)
				require.NoError(t, err)
				scripts[vs.Names[i].Name] = src
			}
			return true
		})
	}
	names := make([]string, 0, len(scripts))
	for name := range scripts {
		names = append(names, name)
	}
	slices.Sort(names)
	require.Subset(t, names, []string{"luaAdopt", "luaBump", "luaCompareDelete", "luaDrop", "luaPublish", "luaReserve", "luaTouch"},
		"the test reads every script")

	callRe := regexp.MustCompile(`redis\.(?:p?call)\(\s*"([^"]+)"([^)]*)\)`)
	quotedRe := regexp.MustCompile(`"([^"]*)"`)
	for _, name := range names {
		calls := callRe.FindAllStringSubmatch(scripts[name], -1)
		require.NotEmpty(t, calls, name)
		for _, c := range calls {
			cmd := strings.ToLower(c[1])
			since, ok := scriptSince[cmd]
			switch {
			case !ok:
				t.Errorf("%s calls %s, which scriptSince does not list: add it with the Redis release it needs", name, cmd)
				continue
			case since.after(redisFloor):
				t.Errorf("%s calls %s, which needs Redis %v", name, cmd, since)
			}
			for _, arg := range quotedRe.FindAllStringSubmatch(c[2], -1) {
				if since, ok := newerOptions[cmd][strings.ToUpper(arg[1])]; ok && since.after(redisFloor) {
					t.Errorf("%s calls %s with %s, which needs Redis %v", name, cmd, arg[1], since)
				}
			}
		}
	}
}

// The instance that creates and publishes a pair's sandbox settles the
// pair's quota places at the sandbox's deadline, the record's, even when
// its provisional place (CreateTimeout from the create's start) ends
// later. Before, places only ever moved forward, so with CreateTimeout
// longer than IdleTimeout a place, and the sets' keys, outlived an unused
// sandbox by the difference whenever no instance was left to forget it
// (the soak, checking for keys left after its managers closed, found it).
func TestCreatedSandboxSettlesItsQuotaPlace(t *testing.T) {
	m, mr, rdb := newQuotaManager(t, func(cfg *Config) { cfg.IdleTimeout, cfg.CreateTimeout = time.Minute, 10*time.Minute })
	ctx, k := context.Background(), pairKey{"u", "p"}

	l, err := m.Acquire(ctx, k.user, k.project)
	require.NoError(t, err)
	l.Release()
	deadline, err := strconv.ParseFloat(mr.HGet(m.store.sbxKey(k), fieldDeadline), 64)
	require.NoError(t, err)
	for _, set := range []string{m.store.userLiveKey("u"), m.store.liveKey()} {
		score, err := rdb.ZScore(ctx, set, pairMember(k)).Result()
		require.NoError(t, err, set)
		assert.Equal(t, deadline, score, "%s: the place ends with the sandbox, not at the create's CreateTimeout", set)
		assert.InDelta(t, float64(time.Minute), float64(mr.TTL(set)), float64(5*time.Second), "%s: and so does the set", set)
	}
}

// Dropping a pair's place brings its set's expiry back to the latest place
// left, and an emptied set is gone. Before, the set kept the expiry the
// dropped place had set, so a set whose latest sandbox was removed stayed
// in Redis until that sandbox would have ended.
func TestDroppedPlaceTakesItsSetsExpiryWithIt(t *testing.T) {
	m, mr, _ := newQuotaManager(t, nil)
	ctx := context.Background()
	at := func(d time.Duration) int64 { return time.Now().Add(d).UnixNano() }
	sets := []string{m.store.userLiveKey("u"), m.store.liveKey()}

	m.refreshReservation(ctx, pairKey{"u", "near"}, at(time.Minute))
	m.refreshReservation(ctx, pairKey{"u", "far"}, at(time.Hour))
	for _, set := range sets {
		require.InDelta(t, float64(time.Hour), float64(mr.TTL(set)), float64(time.Minute), set)
	}
	require.NoError(t, m.store.unreserve(ctx, pairKey{"u", "far"}))
	for _, set := range sets {
		assert.InDelta(t, float64(time.Minute), float64(mr.TTL(set)), float64(10*time.Second), "%s expires with the place left", set)
	}
	require.NoError(t, m.store.unreserve(ctx, pairKey{"u", "near"}))
	for _, set := range sets {
		assert.False(t, mr.Exists(set), "%s, emptied, is gone", set)
	}
}

// newQuotaManager is a Manager on a miniredis with both quotas set (ten
// sandboxes), as mutate leaves its Config.
func newQuotaManager(t *testing.T, mutate func(*Config)) (*Manager, *miniredis.Miniredis, *redis.Client) {
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	cfg := Config{Provider: stubProvider{}, Redis: rdb, MaxSandboxes: 10, MaxPerUser: 10}
	if mutate != nil {
		mutate(&cfg)
	}
	m, err := New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	return m, mr, rdb
}
