package pricing

import "testing"

func TestLookupLongestPatternWins(t *testing.T) {
	tab := NewTable(nil, true)
	for model, want := range map[string]float64{
		"claude-opus-4-1-20250805": 15,
		"claude-opus-4-20250514":   15,
		"claude-opus-4-6":          5,
		"claude-opus-5-5":          4,
		"claude-opus-5":            5,
		"claude-sonnet-4-6":        3,
		"claude-sonnet-5-5":        2,
		"claude-haiku-4-5":         1,
		"claude-3-5-haiku-latest":  0.80,
	} {
		p, ok := tab.Lookup(model)
		if !ok || p.Input != want {
			t.Errorf("%s: input $%v/MTok (found %v), want $%v", model, p.Input, ok, want)
		}
	}
	if _, ok := tab.Lookup("gpt-9"); ok {
		t.Error("an unknown model has a price")
	}
	// Configured entries win over the shipped ones, whatever their length.
	mine := NewTable([]Entry{{Models: []string{"claude-*"}, Price: Price{Input: 9}}}, true)
	if p, _ := mine.Lookup("claude-sonnet-4-6"); p.Input != 9 {
		t.Errorf("configured price not used: %v", p.Input)
	}
	if _, ok := NewTable(nil, false).Lookup("claude-sonnet-4-6"); ok {
		t.Error("defaults off, yet a price")
	}
}

func TestMicroUSD(t *testing.T) {
	sonnet := std(3, 15)
	for _, tc := range []struct {
		name string
		p    Price
		u    Usage
		want int64
	}{
		// 1,000 in × $3 + 500 out × $15 = 3,000 + 7,500 µ$.
		{"plain", sonnet, Usage{InputTokens: 1000, OutputTokens: 500}, 10500},
		// 6,000 written for 5 minutes at $3.75, read 6,000 at $0.30.
		{"cache write", sonnet, Usage{InputTokens: 100, CacheWriteTokens: 6000, OutputTokens: 10}, 300 + 22500 + 150},
		{"cache read", sonnet, Usage{InputTokens: 100, CacheReadTokens: 6000, OutputTokens: 10}, 300 + 1800 + 150},
		// 2,000 of 6,000 written for an hour at $6.
		{"1h write", sonnet, Usage{CacheWriteTokens: 6000, CacheWrite1h: 2000}, 4000*3.75 + 2000*6},
		{"batch", sonnet, Usage{InputTokens: 1000, OutputTokens: 500, Batch: true}, 5250},
		{"rounding", sonnet, Usage{InputTokens: 1}, 3},
		{"fraction", std(0.10, 0.50), Usage{InputTokens: 3}, 0},
	} {
		if got := tc.p.MicroUSD(tc.u); got != tc.want {
			t.Errorf("%s: %d µ$, want %d", tc.name, got, tc.want)
		}
	}
	// Haiku 5.5's long-prompt band prices every token of the call.
	h, _ := NewTable(nil, true).Lookup("claude-haiku-5-5")
	if got := h.MicroUSD(Usage{InputTokens: 100000, OutputTokens: 1000}); got != 100000*0.10+1000*0.50 {
		t.Errorf("haiku 5.5 at the threshold: %d", got)
	}
	if got := h.MicroUSD(Usage{InputTokens: 100001, OutputTokens: 1000}); got != int64(100001*0.50+1000*2.50+0.5) {
		t.Errorf("haiku 5.5 over the threshold: %d", got)
	}
	if USD(1500000) != 1.5 {
		t.Error("USD")
	}
}
