package sandboxpool

import (
	"fmt"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Pairs whose 64-bit hashes collide share a chain: each is still found by
// its own key, and unlinking any position leaves the others reachable.
func TestShardHashChains(t *testing.T) {
	p := newPool(1)
	sh := &p.shards[0]
	const h = 42 // every slot below in one chain, as colliding hashes would be
	var slots []*slot
	for i := range 4 {
		s := &slot{key: pairKey{fmt.Sprint("u", i), "p"}, heapIdx: -1}
		sh.insertLocked(h, s)
		slots = append(slots, s)
	}
	other := &slot{key: pairKey{"other", "p"}, heapIdx: -1}
	sh.insertLocked(7, other)
	for _, s := range slots {
		assert.Same(t, s, sh.lookupLocked(h, s.key))
	}
	assert.Nil(t, sh.lookupLocked(h, pairKey{"missing", "p"}))
	assert.Nil(t, sh.lookupLocked(h, other.key), "another hash's slot is not in this chain")

	for _, i := range []int{1, 3, 0, 2} { // middle, head (last inserted), tail, the only one left
		require.True(t, sh.unlinkLocked(h, slots[i]))
		assert.Nil(t, sh.lookupLocked(h, slots[i].key))
		assert.Nil(t, slots[i].next)
		assert.False(t, sh.unlinkLocked(h, slots[i]), "unlinking twice is refused")
	}
	for _, s := range slots {
		assert.Nil(t, sh.lookupLocked(h, s.key))
	}
	_, present := sh.slots[h]
	assert.False(t, present, "an emptied chain leaves no map entry")
	assert.Same(t, other, sh.lookupLocked(7, other.key))
}

// A slot stays within one 128-byte allocation: what a hit touches is on its
// first cache line, and a million pairs cost what BenchmarkMemoryPerPair says.
func TestSlotSize(t *testing.T) {
	assert.LessOrEqual(t, unsafe.Sizeof(slot{}), uintptr(128))
}
