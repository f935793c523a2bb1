package main

import (
	"context"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestRunsWithNothingConfigured runs the example as a user would first run
// it: no E2B key and no Redis, so against the in-process fake E2B.
func TestRunsWithNothingConfigured(t *testing.T) {
	for _, name := range []string{"E2B_API_KEY", "E2B_API_URL", "E2B_DOMAIN", "E2B_SANDBOX_URL", "REDIS_URL"} {
		t.Setenv(name, "") // restored after the test
		require.NoError(t, os.Unsetenv(name))
	}
	var out strings.Builder
	require.NoError(t, run(context.Background(), &out))
	// The fake serves envd itself (E2B_SANDBOX_URL's role), on loopback.
	require.Regexp(t, regexp.MustCompile(`^sandbox i[0-9a-z]+ envd at http://127\.0\.0\.1:[0-9]+\n$`), out.String())
}
