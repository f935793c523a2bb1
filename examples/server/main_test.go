package main

// End-to-end: build the example binary, start it with nothing configured
// (embedded Redis and fake E2B), drive it over HTTP, stop it with SIGTERM.

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().String()
}

func TestServerEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the example binary")
	}
	bin := filepath.Join(t.TempDir(), "server")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Stderr = os.Stderr
	require.NoError(t, build.Run())

	addr := freeAddr(t)
	cmd := exec.Command(bin, "-addr", addr)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "LOG_FORMAT=json"}
	// The logs go to a buffer, not through StderrPipe: Wait closes a
	// StderrPipe as soon as the process exits, which can drop its last
	// lines unread, while with a plain writer Wait returns only after
	// everything the process wrote has been copied.
	var logs bytes.Buffer
	cmd.Stderr = &logs
	require.NoError(t, cmd.Start())
	exited := false
	t.Cleanup(func() {
		if !exited {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})

	base := "http://" + addr
	client := &http.Client{Timeout: 10 * time.Second}
	require.Eventually(t, func() bool {
		resp, err := client.Get(base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 30*time.Second, 50*time.Millisecond, "server did not become healthy")

	type acquired struct {
		SandboxID string    `json:"sandbox_id"`
		EnvdURL   string    `json:"envd_url"`
		CreatedAt time.Time `json:"created_at"`
		Reused    bool      `json:"reused"`
	}
	post := func(path string) (int, acquired, http.Header) {
		resp, err := client.Post(base+path, "application/json", nil)
		require.NoError(t, err)
		defer resp.Body.Close()
		var a acquired
		body, _ := io.ReadAll(resp.Body)
		_ = json.Unmarshal(body, &a)
		return resp.StatusCode, a, resp.Header
	}
	code, first, _ := post("/v1/users/alice/projects/demo/sandbox")
	require.Equal(t, http.StatusOK, code)
	assert.False(t, first.Reused)
	assert.NotEmpty(t, first.SandboxID)
	assert.NotEmpty(t, first.EnvdURL)
	assert.False(t, first.CreatedAt.IsZero())
	code, second, _ := post("/v1/users/alice/projects/demo/sandbox")
	require.Equal(t, http.StatusOK, code)
	assert.True(t, second.Reused)
	assert.Equal(t, first.SandboxID, second.SandboxID)

	resp, err := client.Post(base+"/v1/users/bad%20user/projects/demo/sandbox", "application/json", nil)
	require.NoError(t, err)
	var e map[string]string
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&e))
	resp.Body.Close()
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Equal(t, "invalid_id", e["error"])

	resp, err = client.Get(base + "/v1/stats")
	require.NoError(t, err)
	var st map[string]any
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&st))
	resp.Body.Close()
	assert.EqualValues(t, 2, st["Acquires"])
	assert.EqualValues(t, 1, st["Creates"])
	assert.EqualValues(t, 1, st["MemoryHits"])
	assert.EqualValues(t, 1, st["Active"])

	resp, err = client.Get(base + "/metrics")
	require.NoError(t, err)
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Contains(t, string(metrics), "sandboxpool_acquires_total 2")
	assert.Contains(t, string(metrics), "sandboxpool_creates_total 1")
	assert.Contains(t, string(metrics), `sandboxpool_acquire_duration_seconds_count{outcome="created"} 1`)
	assert.Contains(t, string(metrics), `sandboxpool_acquire_duration_seconds_count{outcome="memory_hit"} 1`)

	req, _ := http.NewRequest(http.MethodDelete, base+"/v1/users/alice/projects/demo/sandbox", nil)
	resp, err = client.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusNoContent, resp.StatusCode)
	code, third, _ := post("/v1/users/alice/projects/demo/sandbox")
	require.Equal(t, http.StatusOK, code)
	assert.NotEqual(t, first.SandboxID, third.SandboxID)

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		exited = true
		require.NoError(t, err, "clean exit on SIGTERM")
	case <-time.After(30 * time.Second):
		t.Fatal("server did not stop within 30s of SIGTERM")
	}
	joined := logs.String() // Wait has returned: nothing writes to it any more
	assert.Contains(t, joined, "embedded in-process Redis")
	assert.Contains(t, joined, "fake E2B server")
	assert.Contains(t, joined, "shutting down")
	assert.NotContains(t, joined, "e2b_0123456789abcdef", "the fake's API key never reaches the logs")
}
