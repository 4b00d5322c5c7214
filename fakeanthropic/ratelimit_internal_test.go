package fakeanthropic

import (
	"testing"
	"time"
)

func TestBucketSetLimit(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name              string
		limit, newLimit   int
		used              float64
		wantLevel, atHalf float64 // level at once, and 30 s later
	}{
		{"lowered: the shortfall stays", 10, 5, 4, 1, 3.5},
		{"lowered below what was used", 10, 2, 4, -2, -1},
		{"raised: the difference is granted", 10, 20, 4, 16, 20},
		{"realtime debt carries over", 8_000, 4_000, 9_000, -5_000, -3_000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBucket(tt.limit, now)
			b.take(tt.used)
			b.setLimit(tt.newLimit, now)
			if b.level != tt.wantLevel || b.limit != float64(tt.newLimit) {
				t.Errorf("limit %v, level %v: want %d, %v", b.limit, b.level, tt.newLimit, tt.wantLevel)
			}
			b.refill(now.Add(30 * time.Second)) // refills at the new rate
			if b.level != tt.atHalf {
				t.Errorf("level %v 30 s later, want %v", b.level, tt.atHalf)
			}
		})
	}
}
