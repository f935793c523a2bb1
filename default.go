package sandboxpool

import "sync"

// The process-wide Manager. sync.OnceValues (a sync.Once and its results)
// makes the build happen exactly once, however many goroutines call Default
// at the same time; all of them get the same Manager, or the same error. A
// build that panics panics again in every later call, where a bare
// sync.Once would count it as done and leave Default returning a nil
// Manager with no error.
var (
	// buildDefault is replaced in tests to count builds.
	buildDefault = func() (*Manager, error) {
		cfg, err := ConfigFromEnv()
		if err != nil {
			return nil, err
		}
		return New(cfg)
	}
	defaultManager = onceDefault()
)

func onceDefault() func() (*Manager, error) {
	return sync.OnceValues(func() (*Manager, error) { return buildDefault() })
}

// Default returns the process-wide Manager, built on first use from
// ConfigFromEnv. A build error is returned to every caller, then and later:
// fix the environment and restart. The Manager is never built again: close
// it once, at shutdown (later calls get it closed, and its Acquires return
// ErrClosed). Prefer New in libraries and tests; Default suits a main
// package that wants one pool per process.
func Default() (*Manager, error) { return defaultManager() }
