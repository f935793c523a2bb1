package e2b

// ParseRetryAfter exposes parseRetryAfter to the fuzz test.
var ParseRetryAfter = parseRetryAfter
