package e2b

// ParseRetryAfter exposes parseRetryAfter to the fuzz test.
var ParseRetryAfter = parseRetryAfter

// WithoutJitter makes c's backoffs exact, so a test can place a call
// between two of a retrying call's steps.
func WithoutJitter(c *Client) { c.jitter = 0 }
