package sandboxpool

import "github.com/sandboxpool/sandboxpool/internal/secret"

// Secret holds a credential (the E2B API key, an envd access token). Every
// output form masks it: fmt with any verb, slog, JSON (values and map keys),
// XML and text marshalling. Call Reveal where the value must be sent.
// e2b.Secret is the same type.
type Secret = secret.Secret

// NewSecret wraps a credential.
func NewSecret(v string) Secret { return secret.New(v) }
