package sandboxpool_test

// The README's code, run: TestMyHandler is the README's "Testing your own
// handlers" block, and TestREADMEShowsTheCodeThatRuns keeps the two the
// same, so the block a user copies compiles and passes.

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
)

func TestMyHandler(t *testing.T) {
	mr := miniredis.RunT(t)
	fake := e2btest.NewServer(t) // the fake E2B, over real HTTP
	client, err := e2b.New(fake.ClientOptions())
	require.NoError(t, err)
	rdb := redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr()})
	t.Cleanup(func() { rdb.Close() }) // cleanups run last first: after m.Close
	m, err := sandboxpool.New(sandboxpool.Config{Provider: sandboxpool.NewE2BProvider(client), Redis: rdb})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close(context.Background()) })
	srv := httptest.NewServer(myHandler(m))
	t.Cleanup(srv.Close)

	status := func(user string) int { // POST /run?user=<user>
		resp, err := http.Post(srv.URL+"/run?user="+user, "", nil)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	require.Equal(t, http.StatusOK, status("alice"))
	require.Equal(t, http.StatusOK, status("alice"))
	require.Len(t, fake.Running(), 1) // one sandbox, reused

	require.Equal(t, http.StatusBadRequest, status("a%2Ab")) // "a*b": refused before any I/O

	fake.Down(e2btest.Fault{Status: 503}) // an E2B outage: every call fails
	require.Equal(t, http.StatusServiceUnavailable, status("bob"))
	require.Equal(t, http.StatusOK, status("alice")) // alice's sandbox is pooled
	fake.Up()
	require.Equal(t, http.StatusOK, status("bob"))
	require.Len(t, fake.Running(), 2)
}

// myHandler stands for the handler under test: it runs the request in the
// user's sandbox of project "demo".
func myHandler(m *sandboxpool.Manager) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		err := m.Use(r.Context(), r.URL.Query().Get("user"), "demo", func(sb sandboxpool.Sandbox) error {
			return nil // the handler's work in sb
		})
		var ae *e2b.APIError
		switch {
		case err == nil:
			w.WriteHeader(http.StatusOK)
		case errors.Is(err, sandboxpool.ErrInvalidID):
			http.Error(w, err.Error(), http.StatusBadRequest)
		case errors.Is(err, e2b.ErrUnreachable), errors.As(err, &ae) && ae.StatusCode >= 500:
			http.Error(w, "sandboxes unavailable", http.StatusServiceUnavailable)
		default:
			http.Error(w, "internal error", http.StatusInternalServerError)
		}
	})
}

// TestREADMEShowsTheCodeThatRuns: the README's "Testing your own handlers"
// block is TestMyHandler, character for character.
func TestREADMEShowsTheCodeThatRuns(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	require.NoError(t, err)
	_, section, ok := strings.Cut(string(readme), "\n## Testing your own handlers\n")
	require.True(t, ok, "README has no section \"Testing your own handlers\"")
	_, block, ok := strings.Cut(section, "```go\n")
	require.True(t, ok, "the section has no Go block")
	block, _, ok = strings.Cut(block, "```\n")
	require.True(t, ok, "the section's Go block does not end")

	src, err := os.ReadFile("readme_test.go")
	require.NoError(t, err)
	_, fn, ok := strings.Cut(string(src), "\nfunc TestMyHandler(")
	require.True(t, ok)
	fn, _, ok = strings.Cut(fn, "\n}\n")
	require.True(t, ok)
	require.Equal(t, "func TestMyHandler("+fn+"\n}\n", block, "README.md's block differs from TestMyHandler in readme_test.go: copy one to the other")
}
