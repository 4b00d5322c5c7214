package worker

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/jobs"
	"github.com/sluice-dev/sluice/upstream"
)

// TestDeltaLogKeepsOrderAcrossFailures: parts queued while Redis is away
// are written later in one step, in order, text of one block joined.
func TestDeltaLogKeepsOrderAcrossFailures(t *testing.T) {
	var mu sync.Mutex
	var written [][]string
	tries := 0
	d := newDeltaLog(func(_ context.Context, evs []jobs.NewEvent) error {
		mu.Lock()
		defer mu.Unlock()
		tries++
		if tries == 1 {
			return errors.New("redis away")
		}
		var batch []string
		for _, ev := range evs {
			batch = append(batch, ev.Name+" "+string(ev.Data))
		}
		written = append(written, batch)
		return nil
	}, func() { t.Error("refused") }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	for _, p := range []upstream.Part{
		{Kind: upstream.PartText, Index: 0, Text: "a"},
		{Kind: upstream.PartText, Index: 0, Text: "b"},
		{Kind: upstream.PartBlockStart, Index: 1, Raw: []byte(`{"type":"tool_use","id":"t","name":"n","input":{}}`)},
		{Kind: upstream.PartBlockDelta, Index: 1, Raw: []byte(`{"type":"input_json_delta","partial_json":"{}"}`)},
		{Kind: upstream.PartBlockStop, Index: 1},
		{Kind: upstream.PartText, Index: 2, Text: "c"},
		{Kind: upstream.PartEvent, Raw: []byte(`{"type":"future"}`)},
	} {
		d.add(p)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go d.run(ctx)
	defer d.close()
	if err := d.flush(ctx); err != nil {
		t.Fatal(err)
	}
	want := [][]string{{
		`delta {"text":"ab","index":0}`,
		`block_start {"index":1,"content_block":{"type":"tool_use","id":"t","name":"n","input":{}}}`,
		`block_delta {"index":1,"delta":{"type":"input_json_delta","partial_json":"{}"}}`,
		`block_stop {"index":1}`,
		`delta {"text":"c","index":2}`,
		`upstream_event {"type":"future"}`,
	}}
	mu.Lock()
	defer mu.Unlock()
	if diff := cmp.Diff(want, written); diff != "" || tries != 2 {
		t.Errorf("%d tries; written (-want +got):\n%s", tries, diff)
	}
}

// TestDeltaLogStopsOnRefusal: a write the job refuses stops the call and
// is what flush reports.
func TestDeltaLogStopsOnRefusal(t *testing.T) {
	stopped := make(chan struct{})
	d := newDeltaLog(func(context.Context, []jobs.NewEvent) error {
		return &jobs.StateError{Current: jobs.Canceled}
	}, func() { close(stopped) }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	d.add(upstream.Part{Kind: upstream.PartText, Text: "x"})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go d.run(ctx)
	defer d.close()
	<-stopped
	var se *jobs.StateError
	if err := d.flush(ctx); !errors.As(err, &se) {
		t.Fatalf("flush: %v, want the refusal", err)
	}
	d.add(upstream.Part{Kind: upstream.PartText, Text: "y"}) // dropped: the job is gone
	if err := d.flush(ctx); !errors.As(err, &se) {
		t.Fatalf("flush after: %v", err)
	}
}

// TestDeltaLogWritesNothingAfterClose: close waits for the write in flight
// and writes nothing after it (what an attempt logs comes before its end),
// and may be called again.
func TestDeltaLogWritesNothingAfterClose(t *testing.T) {
	inWrite, release := make(chan struct{}), make(chan struct{})
	var mu sync.Mutex
	var written []string
	first := true
	d := newDeltaLog(func(_ context.Context, evs []jobs.NewEvent) error {
		if first { // the writer's goroutine only
			first = false
			close(inWrite)
			<-release
		}
		mu.Lock()
		defer mu.Unlock()
		for _, ev := range evs {
			written = append(written, string(ev.Data))
		}
		return nil
	}, func() { t.Error("refused") }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go d.run(ctx)
	d.add(upstream.Part{Kind: upstream.PartText, Index: 0, Text: "a"})
	<-inWrite
	d.add(upstream.Part{Kind: upstream.PartText, Index: 1, Text: "b"}) // waits for the next write, which never comes
	closed := make(chan struct{})
	go func() { d.close(); close(closed) }()
	<-d.quit // close has begun
	select {
	case <-closed:
		t.Fatal("close returned while a write was in flight")
	default:
	}
	close(release)
	<-closed
	d.close()
	mu.Lock()
	defer mu.Unlock()
	if diff := cmp.Diff([]string{`{"text":"a","index":0}`}, written); diff != "" {
		t.Fatalf("written (-want +got):\n%s", diff)
	}
}
