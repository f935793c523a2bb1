package sandboxpool

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The real clock follows the wall clock forward at once and back by a
// little at once, and after a larger step back runs slower until it has
// caught up, never stepping back itself: every deadline the Manager keeps
// is an instant of it.
func TestClockFollowsTheWallClockAndSlewsAStepBack(t *testing.T) {
	start := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC).UnixNano()
	wall, mono := start, int64(0)
	c := newClock(nil, true, func() (int64, int64) { return wall, mono }, 10*time.Minute)
	pass := func(d time.Duration) { wall, mono = wall+int64(d), mono+int64(d); c.refresh() }
	step := func(d time.Duration) { wall += int64(d); c.refresh() }

	require.Equal(t, start, c.precise())
	pass(time.Minute)
	assert.Equal(t, start+int64(time.Minute), c.precise())
	step(time.Hour)
	assert.Equal(t, wall, c.precise(), "a step forward is followed at once")
	assert.Equal(t, wall, c.coarse())
	step(-time.Duration(maxBackStep))
	assert.Equal(t, wall, c.precise(), "so is a step back of maxBackStep")

	before := c.precise()
	step(-5 * time.Minute)
	assert.Equal(t, before, c.precise(), "a larger step back is not followed")
	pass(10 * time.Second)
	assert.Equal(t, before+int64(9*time.Second), c.precise(), "the clock runs at 9/10 of real time instead")
	pass(49*time.Minute + 40*time.Second) // 10 s short of catching up: 50 min for a 5 min step
	assert.Equal(t, wall+int64(time.Second), c.precise())
	assert.Equal(t, wall+int64(time.Second), c.coarse())
	pass(time.Minute)
	assert.Equal(t, wall, c.precise(), "caught up: it follows the wall clock again")
	pass(time.Second)
	assert.Equal(t, wall, c.precise())

	step(-10*time.Minute - 1)
	assert.Equal(t, wall, c.precise(), "a step back beyond maxSlew is followed at once")
	pass(time.Second)
	assert.Equal(t, wall, c.precise())
}
