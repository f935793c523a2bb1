package sandboxpool

import "sync"

// The process-wide Manager. sync.Once makes the build happen exactly once,
// however many goroutines call Default at the same time; all of them get
// the same Manager, or the same error.
var (
	defaultOnce sync.Once
	defaultMgr  *Manager
	defaultErr  error
	// buildDefault is replaced in tests to count builds.
	buildDefault = func() (*Manager, error) {
		cfg, err := ConfigFromEnv()
		if err != nil {
			return nil, err
		}
		return New(cfg)
	}
)

// Default returns the process-wide Manager, built on first use from
// ConfigFromEnv. A build error is returned to every caller, then and later:
// fix the environment and restart. Prefer New in libraries and tests;
// Default suits a main package that wants one pool per process.
func Default() (*Manager, error) {
	defaultOnce.Do(func() { defaultMgr, defaultErr = buildDefault() })
	return defaultMgr, defaultErr
}
