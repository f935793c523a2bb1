package sandboxpool_test

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool"
)

func TestValidateIDs(t *testing.T) {
	long := strings.Repeat("a", sandboxpool.MaxIDLen)
	cases := []struct {
		name, user, project, field string
	}{
		{"plain", "alice", "proj-1", ""},
		{"all allowed chars", "A.b_c-d@e+f=9", "0x", ""},
		{"max length", long, long, ""},
		{"empty user", "", "p", "user"},
		{"empty project", "u", "", "project"},
		{"too long", long + "a", "p", "user"},
		{"colon", "a:b", "p", "user"},
		{"braces", "u", "{p}", "project"},
		{"glob star", "u*", "p", "user"},
		{"glob question", "u?", "p", "user"},
		{"glob bracket", "u[1]", "p", "user"},
		{"space", "u p", "p", "user"},
		{"tab", "u", "p\t", "project"},
		{"newline", "u\n", "p", "user"},
		{"nul", "u\x00", "p", "user"},
		{"non-ascii", "ü", "p", "user"},
		{"invalid utf8", "u\xff", "p", "user"},
		{"leading dot", ".u", "p", "user"},
		{"leading dash", "u", "-p", "project"},
		{"slash", "u/p", "p", "user"},
		{"crlf injection", "u\r\nDEL *", "p", "user"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := sandboxpool.ValidateIDs(tc.user, tc.project)
			if tc.field == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, sandboxpool.ErrInvalidID)
			var ve *sandboxpool.ValidationError
			require.True(t, errors.As(err, &ve))
			assert.Equal(t, tc.field, ve.Field)
			assert.NotEmpty(t, ve.Reason)
		})
	}
}

// FuzzPairKey proves the (user, project) → Redis key mapping injective for
// valid ids, and that no accepted id can leave its key's hash tag or its
// namespace.
func FuzzPairKey(f *testing.F) {
	for _, s := range [][4]string{{"a", "b", "a", "b"}, {"a", "b:c", "a:b", "c"}, {"u", "p}x", "u", "p"}, {"x{", "y", "x", "{y"}, {"a.b", "c", "a", "b.c"}} {
		f.Add(s[0], s[1], s[2], s[3])
	}
	f.Fuzz(func(t *testing.T, u1, p1, u2, p2 string) {
		const ns = "sandboxpool"
		ok1 := sandboxpool.ValidateIDs(u1, p1) == nil
		ok2 := sandboxpool.ValidateIDs(u2, p2) == nil
		for _, ok := range []struct {
			valid bool
			u, p  string
		}{{ok1, u1, p1}, {ok2, u2, p2}} {
			if !ok.valid {
				continue
			}
			checkAccepted(t, ok.u)
			checkAccepted(t, ok.p)
			key := sandboxpool.RedisKey(ns, ok.u, ok.p, "sbx")
			// The key has exactly one hash tag, holding exactly this pair.
			require.Equal(t, 1, strings.Count(key, "{"))
			require.Equal(t, 1, strings.Count(key, "}"))
			open, closing := strings.Index(key, "{"), strings.Index(key, "}")
			require.Equal(t, ok.u+":"+ok.p, key[open+1:closing])
			require.Equal(t, ns+":", key[:open])
			require.Equal(t, ":sbx", key[closing+1:])
			require.Equal(t, 3, strings.Count(key, ":"), "exactly the separators the layout puts there")
		}
		if ok1 && ok2 && (u1 != u2 || p1 != p2) {
			require.NotEqual(t, sandboxpool.RedisKey(ns, u1, p1, "sbx"), sandboxpool.RedisKey(ns, u2, p2, "sbx"))
			require.NotEqual(t, sandboxpool.RedisKey(ns, u1, p1, "lock"), sandboxpool.RedisKey(ns, u2, p2, "lock"))
		}
	})
}

func checkAccepted(t *testing.T, id string) {
	t.Helper()
	require.True(t, utf8.ValidString(id))
	require.LessOrEqual(t, len(id), sandboxpool.MaxIDLen)
	require.NotEmpty(t, id)
	require.False(t, strings.ContainsAny(id, ":{}*?[]\\^ \t\r\n/\"'"), "%q", id)
	for _, r := range id {
		require.True(t, r > 0x20 && r < 0x7f, "%q", id)
	}
}

// FuzzRemovalMessage: whatever is published on the removal channel, parsing
// it never accepts an invalid pair or an empty id, and an announcement of a
// valid pair's sandboxes parses back to exactly that pair and those ids.
func FuzzRemovalMessage(f *testing.F) {
	f.Add("u", "p", "i1", "i2", "u:p i1")
	f.Add("a.b", "c-d", "x", "y", "bad:user:p i1")
	f.Add("u", "p", "i 1", "", ":p i1")
	f.Fuzz(func(t *testing.T, user, project, id1, id2, raw string) {
		if u, p, ids, ok := sandboxpool.ParseRemoval(raw); ok {
			require.NoError(t, sandboxpool.ValidateIDs(u, p), "%q", raw)
			require.NotEmpty(t, ids)
			for _, id := range ids {
				require.NotEmpty(t, id)
				require.Len(t, strings.Fields(id), 1)
			}
		}
		ids := []string{id1, id2}
		if sandboxpool.ValidateIDs(user, project) != nil || slices.ContainsFunc(ids, func(id string) bool { return len(strings.Fields(id)) != 1 || strings.TrimSpace(id) != id }) {
			return // not a pair the Manager holds, or not an id E2B gives
		}
		u, p, got, ok := sandboxpool.ParseRemoval(sandboxpool.RemovalMessage(user, project, ids))
		require.True(t, ok)
		require.Equal(t, [2]string{user, project}, [2]string{u, p})
		require.Equal(t, ids, got)
	})
}
