package e2b_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
)

// recognisableKey is easy to spot anywhere it might leak.
const recognisableKey = "e2b_5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7"

// TestSecretScan drives every operation, success and failure, and scans
// everything a user could print or log for the API key and envd tokens.
func TestSecretScan(t *testing.T) {
	srv := e2btest.Start(e2btest.Config{APIKey: recognisableKey})
	defer srv.Close()
	opts := srv.ClientOptions()
	c, err := e2b.New(opts)
	require.NoError(t, err)
	defer c.CloseIdleConnections()

	var captured []any
	var tokens []string
	keep := func(vals ...any) { captured = append(captured, vals...) }
	keep(opts, &opts, c)

	sb, err := c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.NoError(t, err)
	tokens = append(tokens, sb.EnvdAccessToken.Reveal())
	keep(sb, &sb)
	got, err := c.Get(ctx, sb.ID)
	require.NoError(t, err)
	keep(got)
	conn, err := c.Connect(ctx, sb.ID, time.Minute)
	require.NoError(t, err)
	tokens = append(tokens, conn.EnvdAccessToken.Reveal())
	keep(conn)
	list, err := c.List(ctx, map[string]string{"a": "b"})
	require.NoError(t, err)
	keep(list)

	// Failures of every kind, including a server that echoes the key.
	srv.Inject(e2btest.OpGet, e2btest.Fault{Status: http.StatusInternalServerError, Message: "upstream said: key " + recognisableKey + " rejected"})
	srv.Inject(e2btest.OpGet, e2btest.Fault{Status: http.StatusInternalServerError, Message: "again " + recognisableKey})
	srv.Inject(e2btest.OpGet, e2btest.Fault{Status: http.StatusInternalServerError, Message: recognisableKey}, e2btest.Fault{Status: http.StatusInternalServerError, Message: recognisableKey})
	_, err = c.Get(ctx, sb.ID)
	require.Error(t, err)
	keep(err)
	// envd echoing the access token it was sent.
	srv.Inject(e2btest.OpHealth, e2btest.Fault{Status: http.StatusUnauthorized, Message: "token " + sb.EnvdAccessToken.Reveal() + " is not valid"})
	_, err = c.Healthy(ctx, sb)
	require.Error(t, err)
	keep(err)
	srv.Inject(e2btest.OpCreate, e2btest.Fault{Drop: true, AfterEffect: true})
	_, err = c.Create(ctx, e2b.CreateParams{Template: "base"})
	require.Error(t, err)
	keep(err)
	_, err = c.Get(ctx, "imissing")
	keep(err)
	srv.Inject(e2btest.OpList, e2btest.Fault{Status: 429, RetryAfter: time.Hour})
	_, err = c.List(ctx, nil)
	keep(err)
	wrong := opts
	wrong.APIKey = e2b.NewSecret(recognisableKey + "0")
	bad, err := e2b.New(wrong)
	require.NoError(t, err)
	_, err = bad.Get(ctx, sb.ID)
	keep(err, wrong, bad)
	_, err = e2b.New(e2b.Options{APIKey: opts.APIKey, BaseURL: "::not a url::"})
	keep(err)

	var out bytes.Buffer
	logger := slog.New(slog.NewJSONHandler(&out, nil))
	textLogger := slog.New(slog.NewTextHandler(&out, nil))
	for _, v := range captured {
		for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q"} {
			fmt.Fprintf(&out, verb+"\n", v)
		}
		if e, ok := v.(error); ok && e != nil {
			out.WriteString(e.Error())
		}
		logger.Info("captured", "value", v)
		textLogger.Error("captured", "value", v)
		if b, err := json.Marshal(v); err == nil {
			out.Write(b)
		}
	}
	require.NotEmpty(t, tokens[0])
	for _, secret := range append(tokens, recognisableKey, "5ec7e75ec7e7") {
		assert.NotContains(t, out.String(), secret)
	}
	assert.Contains(t, out.String(), "[REDACTED]", "the echoed key was replaced, not dropped silently")
}
