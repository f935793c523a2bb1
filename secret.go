package sandboxpool

import (
	"fmt"
	"log/slog"
)

const redacted = "[REDACTED]"

// Secret holds a credential (an API key, an envd access token). Every output
// form masks it: fmt with any verb, slog, JSON (values and map keys), XML and
// text marshalling. It is a struct, not a string type, so that no conversion
// or reflection-based encoder can read it by accident; call Reveal where the
// value must be sent. The zero value is the empty secret.
type Secret struct{ v string }

// NewSecret wraps a credential.
func NewSecret(v string) Secret { return Secret{v} }

// Reveal returns the secret's value. Call it only where the value is sent.
func (s Secret) Reveal() string { return s.v }

// IsZero reports whether the secret is empty.
func (s Secret) IsZero() bool { return s.v == "" }

// String returns a mask, never the value.
func (s Secret) String() string { return s.mask() }

// GoString returns a mask, never the value.
func (s Secret) GoString() string { return s.mask() }

// Format masks the value for every fmt verb, %#v and %q included.
func (s Secret) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(s.mask())) }

// LogValue masks the value in slog output.
func (s Secret) LogValue() slog.Value { return slog.StringValue(s.mask()) }

// MarshalJSON masks the value in JSON.
func (s Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + s.mask() + `"`), nil }

// MarshalText masks the value in text encodings (and JSON map keys).
func (s Secret) MarshalText() ([]byte, error) { return []byte(s.mask()), nil }

func (s Secret) mask() string {
	if s.v == "" {
		return ""
	}
	return redacted
}
