// Command server is a small HTTP service that gives each (user, project)
// its own sandbox through sandboxpool, the way a backend would.
//
//	go run ./examples/server            # listens on :8080
//
// With nothing configured it runs on embedded stand-ins: an in-process
// miniredis when REDIS_URL is unset, and the fake E2B server (e2btest) when
// E2B_API_KEY is unset; it says so in one log line each. With REDIS_URL and
// E2B_API_KEY set it uses the real services. Every SANDBOXPOOL_* variable of
// sandboxpool.ConfigFromEnv applies. LOG_FORMAT=json|text (default text),
// LOG_LEVEL=debug|info|warn|error (default info).
//
// Routes:
//
//	POST   /v1/users/{user}/projects/{project}/sandbox   acquire → {"sandbox_id","envd_url","created_at","reused"}
//	DELETE /v1/users/{user}/projects/{project}/sandbox   remove
//	GET    /v1/stats                                     Manager.Stats as JSON
//	GET    /healthz                                      liveness
//	GET    /metrics                                      Prometheus text format
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"

	"github.com/sandboxpool/sandboxpool"
	"github.com/sandboxpool/sandboxpool/e2b"
	"github.com/sandboxpool/sandboxpool/e2b/e2btest"
	"github.com/sandboxpool/sandboxpool/metrics"
)

// shutdownTimeout bounds the graceful shutdown: in-flight requests, then
// the Manager's background work.
const shutdownTimeout = 20 * time.Second

func main() {
	addr := flag.String("addr", ":8080", "listen address")
	timeout := flag.Duration("timeout", 60*time.Second, "per-request timeout for acquire and remove")
	flag.Parse()
	log := newLogger()
	if err := run(*addr, *timeout, log); err != nil {
		log.Error("server stopped", "error", err)
		os.Exit(1)
	}
}

func newLogger() *slog.Logger {
	var level slog.Level
	if err := level.UnmarshalText([]byte(os.Getenv("LOG_LEVEL"))); err != nil {
		level = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: level}
	if os.Getenv("LOG_FORMAT") == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

func run(addr string, timeout time.Duration, log *slog.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	cfg, err := sandboxpool.ConfigFromEnv()
	if err != nil {
		return err
	}
	if cfg.Redis == nil {
		mr, err := miniredis.Run()
		if err != nil {
			return fmt.Errorf("embedded Redis: %w", err)
		}
		defer mr.Close()
		// miniredis expires keys only when told time has passed.
		go func() {
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					mr.FastForward(time.Second)
				}
			}
		}()
		cfg.Redis = redis.NewClient(&redis.Options{ContextTimeoutEnabled: true, Addr: mr.Addr()})
		log.Info("REDIS_URL is not set: using an embedded in-process Redis (miniredis)")
	}
	defer cfg.Redis.Close()
	if cfg.Provider == nil {
		fake := e2btest.Start(e2btest.Config{})
		defer fake.Close()
		client, err := e2b.New(fake.ClientOptions())
		if err != nil {
			return err
		}
		cfg.Provider = sandboxpool.NewE2BProvider(client)
		log.Info("E2B_API_KEY is not set: using the in-process fake E2B server (no real sandboxes)", "api", fake.URL)
	}
	cfg.Logger = log
	met := metrics.New("")
	cfg.OnAcquire = met.ObserveAcquire
	m, err := sandboxpool.New(cfg)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(met.Collector(m), collectors.NewGoCollector())

	srv := &http.Server{Addr: addr, Handler: routes(m, reg, timeout, log), ReadHeaderTimeout: 10 * time.Second}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	log.Info("listening", "addr", ln.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	return errors.Join(srv.Shutdown(sctx), m.Close(sctx))
}

func routes(m *sandboxpool.Manager, reg *prometheus.Registry, timeout time.Duration, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/users/{user}/projects/{project}/sandbox", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), timeout)
		defer cancel()
		lease, err := m.Acquire(ctx, r.PathValue("user"), r.PathValue("project"))
		if err != nil {
			writeError(w, r, log, err)
			return
		}
		defer lease.Release()
		sb := lease.Sandbox()
		writeJSON(w, http.StatusOK, map[string]any{
			"sandbox_id": sb.ID, "envd_url": sb.EnvdURL(), "created_at": sb.CreatedAt.UTC(), "reused": lease.Reused(),
		})
	})
	mux.HandleFunc("DELETE /v1/users/{user}/projects/{project}/sandbox", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), timeout)
		defer cancel()
		if err := m.Remove(ctx, r.PathValue("user"), r.PathValue("project")); err != nil {
			writeError(w, r, log, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /v1/stats", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, m.Stats()) })
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "redis_degraded": m.Stats().RedisDegraded})
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	return mux
}

// statusClientClosed is nginx's "client closed request": the status logged
// for a request whose client hung up. No response reaches that client.
const statusClientClosed = 499

// writeError maps the library's errors to HTTP statuses. The message is the
// error's text, which the library keeps free of credentials.
func writeError(w http.ResponseWriter, r *http.Request, log *slog.Logger, err error) {
	status, code := http.StatusInternalServerError, "internal"
	var ve *sandboxpool.ValidationError
	var ae *e2b.APIError
	switch {
	case errors.As(err, &ve):
		status, code = http.StatusBadRequest, "invalid_id"
	case r.Context().Err() != nil && errors.Is(err, context.Canceled):
		// The request's own context ended: its client hung up. (An
		// Acquire cut short by Close also wraps context.Canceled, with the
		// client still there: it wraps ErrClosed too, and is answered below
		// as a shutdown.)
		status, code = statusClientClosed, "client_gone"
	case errors.Is(err, sandboxpool.ErrRateLimited):
		status, code = http.StatusTooManyRequests, "rate_limited"
	case errors.Is(err, sandboxpool.ErrQuotaExceeded):
		status, code = http.StatusTooManyRequests, "quota_exceeded"
	case errors.Is(err, context.DeadlineExceeded):
		status, code = http.StatusGatewayTimeout, "timeout"
	case errors.Is(err, sandboxpool.ErrClosed):
		status, code = http.StatusServiceUnavailable, "shutting_down"
	case errors.Is(err, sandboxpool.ErrUnavailable):
		status, code = http.StatusServiceUnavailable, "redis_unavailable"
	case errors.Is(err, sandboxpool.ErrSandboxUnresponsive):
		// The pair's sandbox hung; Retry-After says when it is replaced.
		status, code = http.StatusServiceUnavailable, "sandbox_unresponsive"
	case errors.As(err, &ae) && ae.StatusCode == http.StatusTooManyRequests:
		status, code = http.StatusTooManyRequests, "provider_rate_limited"
	case errors.As(err, &ae), errors.Is(err, e2b.ErrOutcomeUnknown), errors.Is(err, e2b.ErrUnreachable):
		status, code = http.StatusServiceUnavailable, "provider_unavailable"
	}
	if ra, ok := sandboxpool.RetryAfter(err); ok && ra > 0 {
		secs := ra / time.Second // whole seconds, rounded up without overflowing
		if ra%time.Second != 0 {
			secs++
		}
		w.Header().Set("Retry-After", strconv.FormatInt(int64(secs), 10))
	}
	level := slog.LevelWarn
	switch {
	case status == statusClientClosed:
		level = slog.LevelInfo // nothing went wrong on this side
	case status >= 500:
		level = slog.LevelError
	}
	log.LogAttrs(r.Context(), level, "request failed", slog.String("path", r.URL.Path), slog.Int("status", status), slog.Any("error", err))
	writeJSON(w, status, map[string]string{"error": code, "message": err.Error()})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
