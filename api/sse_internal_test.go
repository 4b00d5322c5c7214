package api

import (
	"encoding/json"
	"fmt"
	"testing"

	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/scheduler"
)

// An event goes on the wire exactly as
// fmt.Sprintf("id: %s\nevent: %s\ndata: %s\n\n", id, name, data) writes it.
func TestAppendEvent(t *testing.T) {
	evs := []jobs.Event{
		{ID: "1795983850083-0", Name: "queued", Data: json.RawMessage(`{"position":3,"eta_seconds":12}`)},
		{ID: "1795983850083-0.12", Name: "queued", Data: placeData(scheduler.Place{Position: 9999})},
		{ID: "1795983850090-1", Name: "delta", Data: json.RawMessage(`{"text":"héllo %s %d \\n"}`)},
		{ID: "1-0", Name: "succeeded"},
	}
	buf := []byte("left from the previous event")
	for _, ev := range evs {
		buf = appendEvent(buf[:0], ev)
		if want := fmt.Sprintf("id: %s\nevent: %s\ndata: %s\n\n", ev.ID, ev.Name, ev.Data); string(buf) != want {
			t.Errorf("appendEvent = %q, want %q", buf, want)
		}
	}
}

func TestPlaceData(t *testing.T) {
	for _, p := range [][2]int{{1, 0}, {42, 7}, {10000, 123456}} {
		got := placeData(scheduler.Place{Position: p[0], ETASeconds: p[1]})
		want := fmt.Sprintf(`{"position":%d,"eta_seconds":%d}`, p[0], p[1])
		if string(got) != want {
			t.Errorf("placeData(%v) = %s, want %s", p, got, want)
		}
	}
}
