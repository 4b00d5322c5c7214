package jobs

import "testing"

func TestEventIDs(t *testing.T) {
	for _, tc := range []struct {
		id    string
		valid bool
	}{
		{"1795983850083-0", true},
		{"1795983850083-0.2", true},
		{"1795983850083", false},
		{"1795983850083-0.", false},
		{"1795983850083-0.x", false},
		{"1795983850083-0.1.2", false},
		{"-0", false},
		{"a-b", false},
		{"", false},
	} {
		if got := ValidEventID(tc.id); got != tc.valid {
			t.Errorf("ValidEventID(%q) = %v, want %v", tc.id, got, tc.valid)
		}
	}
	// Logged ids in Stream order, each pushed id after the logged one it
	// follows and before the next logged one.
	order := []string{"5-0", "5-0.1", "5-0.2", "5-0.10", "5-1", "6-0", "6-0.1", "10-0"}
	for i := range order {
		for j := range order {
			want := 0
			if i < j {
				want = -1
			} else if i > j {
				want = 1
			}
			if got := compareEventIDs(order[i], order[j]); got != want {
				t.Errorf("compare(%s, %s) = %d, want %d", order[i], order[j], got, want)
			}
		}
	}
	if got := nextPushedID("5-0"); got != "5-0.1" {
		t.Errorf("after 5-0: %s", got)
	}
	if got := nextPushedID("5-0.9"); got != "5-0.10" {
		t.Errorf("after 5-0.9: %s", got)
	}
	if got := loggedID("5-0.3"); got != "5-0" {
		t.Errorf("logged id of 5-0.3: %s", got)
	}
}
