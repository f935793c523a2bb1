package sandboxpool

import (
	"fmt"
	"strconv"
)

// MaxIDLen is the longest accepted user or project id, in bytes. It keeps
// Redis keys and E2B metadata values short and bounded.
const MaxIDLen = 128

// maxNamespaceLen bounds the namespace the same way ids are bounded.
const maxNamespaceLen = 64

// ValidationError says which id was refused and why.
type ValidationError struct {
	Field  string // "user", "project" or "namespace"
	Reason string
}

func (e *ValidationError) Error() string {
	return fmt.Sprintf("invalid %s: %s", e.Field, e.Reason)
}

// idChar marks the bytes allowed in an id: ASCII letters, digits and
// ". _ - @ + =". Everything else (":" "{" "}" glob characters, whitespace,
// control characters, non-ASCII) is refused, which keeps the pair → Redis key
// mapping injective and every key inside its own hash tag.
var idChar = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
		t[c-'a'+'A'] = true
	}
	for _, c := range "._-@+=" {
		t[c] = true
	}
	return t
}()

func isAlnum(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}

// validateID checks one id. It does not allocate unless the id is invalid.
func validateID(field, id string, maxLen int) error {
	switch {
	case id == "":
		return &ValidationError{Field: field, Reason: "empty"}
	case len(id) > maxLen:
		return &ValidationError{Field: field, Reason: "longer than " + strconv.Itoa(maxLen) + " bytes"}
	case !isAlnum(id[0]):
		return &ValidationError{Field: field, Reason: "must start with an ASCII letter or digit"}
	}
	for i := 0; i < len(id); i++ {
		if !idChar[id[i]] {
			return &ValidationError{Field: field, Reason: fmt.Sprintf("byte %d (%q) is not one of A-Z a-z 0-9 . _ - @ + =", i, id[i])}
		}
	}
	return nil
}

// ValidateIDs reports whether user and project are acceptable ids. The error,
// if any, wraps ErrInvalidID and a *ValidationError.
func ValidateIDs(user, project string) error {
	if err := validateID("user", user, MaxIDLen); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidID, err)
	}
	if err := validateID("project", project, MaxIDLen); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidID, err)
	}
	return nil
}

// pairKey identifies a (user, project) pair in memory. A struct of the two
// strings hashes and compares without building a joined string.
type pairKey struct {
	user, project string
}

// clone returns k with ids of its own, both in one allocation. The pool
// keeps only copies (a flight's key is a clone, a slot copies the ids into
// its own allocation, see keyedSlot): an id the caller sliced from a larger
// buffer (a request body, a token) would otherwise keep that whole buffer
// alive for as long as the pair is pooled.
func (k pairKey) clone() pairKey {
	both := k.user + k.project
	return pairKey{both[:len(k.user)], both[len(k.user):]}
}

// hashTag is the Redis Cluster hash tag of the pair: every key of a pair
// carries it, so they share a slot and one Lua script can touch them all.
func (k pairKey) hashTag() string { return "{" + k.user + ":" + k.project + "}" }

// redisKey builds "<ns>:{<user>:<project>}:<suffix>".
func (k pairKey) redisKey(ns, suffix string) string {
	return ns + ":" + k.hashTag() + ":" + suffix
}
