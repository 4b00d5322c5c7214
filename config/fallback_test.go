package config

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// withGroups is minimal with two more groups: haiku (exact names first)
// and opus (patterns only).
const withGroups = minimal + `  - name: haiku
    models: ["claude-haiku-4-5", "claude-haiku-*"]
    rpm: 50
    input_tpm: 30000
    output_tpm: 8000
  - name: opus
    models: ["claude-opus-*"]
    rpm: 50
    input_tpm: 30000
    output_tpm: 8000
`

// withFallbacks is withGroups with rules (YAML list items, indented 6
// spaces) under tenant acme.
func withFallbacks(rules string) string {
	return strings.Replace(withGroups, "    keys:", "    fallbacks:\n"+rules+"    keys:", 1)
}

func TestFallbackRules(t *testing.T) {
	c := mustParse(t, withFallbacks(`      - {from: sonnet, to: [haiku, claude-opus-4-1], when: [on_wait, on_outage]}
      - {from: opus, to: [claude-haiku-4-5-20251001], when: [never]}
`), env())
	tn := &c.Tenants[0]
	f, ok := tn.FallbackFor("sonnet")
	if !ok || !f.On(FallbackOnWait) || !f.On(FallbackOnOutage) || !cmp.Equal(f.To, []string{"haiku", "claude-opus-4-1"}) {
		t.Fatalf("sonnet's rule: %+v %v", f, ok)
	}
	if f, ok := tn.FallbackFor("opus"); !ok || f.On(FallbackOnWait) || f.On(FallbackOnOutage) {
		t.Errorf("a never rule falls back: %+v", f)
	}
	if _, ok := tn.FallbackFor("haiku"); ok {
		t.Error("haiku has no rule")
	}
	for name, want := range map[string][2]string{
		"haiku":                     {"haiku", "claude-haiku-4-5"}, // the group's first exact name
		"claude-opus-4-1":           {"opus", "claude-opus-4-1"},
		"claude-haiku-4-5-20251001": {"haiku", "claude-haiku-4-5-20251001"},
	} {
		g, m, err := c.FallbackTarget(name)
		if err != nil || g.Name != want[0] || m != want[1] {
			t.Errorf("FallbackTarget(%q) = %v, %q, %v; want %v", name, g, m, err, want)
		}
	}
	var dump strings.Builder
	c.Dump(&dump)
	if !strings.Contains(dump.String(), "  tenants[0].fallbacks[0]  ") || !strings.Contains(dump.String(), "  sonnet → haiku, then claude-opus-4-1 when on_wait, on_outage\n") {
		t.Errorf("the dump does not show the rule:\n%s", dump.String())
	}
	if _, _, err := c.FallbackTarget("opus"); err != ErrPatternsOnly {
		t.Errorf("a group of patterns: %v", err)
	}
	if _, _, err := c.FallbackTarget("gpt-4"); err != ErrUnknownFallback {
		t.Errorf("unknown: %v", err)
	}
}

// Each class of bad rule is refused with a message that says what to
// write instead.
func TestFallbackRulesRefused(t *testing.T) {
	tests := []struct {
		name, rules string
		want        []string
	}{
		{"unknown from group", "      - {from: gemini, to: [haiku], when: [on_wait]}\n",
			[]string{`tenants[0].fallbacks[0].from: unknown model group "gemini"; the groups are sonnet, haiku, opus`}},
		{"from names a model", "      - {from: claude-sonnet-4-6, to: [haiku], when: [on_wait]}\n",
			[]string{`tenants[0].fallbacks[0].from: "claude-sonnet-4-6" is a model, not a model group: write the group that serves it, "sonnet"`}},
		{"missing from", "      - {to: [haiku], when: [on_wait]}\n",
			[]string{`tenants[0].fallbacks[0].from: required: the model group whose requests may fall back (one of sonnet, haiku, opus)`}},
		{"unknown to", "      - {from: sonnet, to: [gpt-4], when: [on_wait]}\n",
			[]string{`tenants[0].fallbacks[0].to[0]: "gpt-4" is neither a model group nor a model served here; the groups are sonnet, haiku, opus`}},
		{"no to", "      - {from: sonnet, when: [on_wait]}\n",
			[]string{`tenants[0].fallbacks[0].to: at least one fallback is required: a model group's name, or a model that a group serves`}},
		{"self by group", "      - {from: sonnet, to: [sonnet], when: [on_wait]}\n",
			[]string{`tenants[0].fallbacks[0].to[0]: a group cannot fall back to itself: "sonnet" is the group this rule falls back from`}},
		{"self by model", "      - {from: sonnet, to: [claude-sonnet-4-5], when: [on_wait]}\n",
			[]string{`tenants[0].fallbacks[0].to[0]: "claude-sonnet-4-5" is served by model group "sonnet", the group this rule falls back from; a group cannot fall back to itself`}},
		{"group of patterns", "      - {from: sonnet, to: [opus], when: [on_wait]}\n",
			[]string{`tenants[0].fallbacks[0].to[0]: model group "opus" lists only patterns (claude-opus-*), so it names no model to run: write the model to use instead, such as "claude-opus-4-5"`}},
		{"a group twice", "      - {from: sonnet, to: [haiku, claude-haiku-4-5-x], when: [on_wait]}\n",
			[]string{`tenants[0].fallbacks[0].to[1]: model group "haiku" is already a fallback at tenants[0].fallbacks[0].to[0]; a group is tried once`}},
		{"two rules for a group", "      - {from: sonnet, to: [haiku], when: [on_wait]}\n      - {from: sonnet, to: [claude-opus-4-1], when: [on_outage]}\n",
			[]string{`tenants[0].fallbacks[1].from: "sonnet" already has a fallback rule at tenants[0].fallbacks[0]; put every fallback of a group in one rule's to list, in the order to try them`}},
		{"bad when", "      - {from: sonnet, to: [haiku], when: [on_wait, slow, on_wait]}\n",
			[]string{`tenants[0].fallbacks[0].when[1]: unknown reason "slow": use on_wait, on_outage or never`,
				`tenants[0].fallbacks[0].when[2]: "on_wait" is listed twice`}},
		{"never with others", "      - {from: sonnet, to: [haiku], when: [never, on_outage]}\n",
			[]string{`tenants[0].fallbacks[0].when[0]: never turns the rule off, so it cannot be listed with other reasons`}},
		{"no when", "      - {from: sonnet, to: [haiku]}\n",
			[]string{`tenants[0].fallbacks[0].when: required: list when to fall back, on_wait (the wait is longer than max_wait) and/or on_outage (the group is in outage), or [never]`}},
		{"two-way cycle", "      - {from: sonnet, to: [haiku], when: [on_wait]}\n      - {from: haiku, to: [claude-sonnet-4-5], when: [on_outage]}\n",
			[]string{`tenants[0].fallbacks[1]: the fallbacks form a cycle, haiku → sonnet → haiku: a group that takes another's requests must not send its own back, or two busy groups would trade requests; remove one direction`}},
		{"three-way cycle", "      - {from: sonnet, to: [haiku], when: [on_wait]}\n      - {from: haiku, to: [claude-opus-4-1], when: [on_wait]}\n      - {from: opus, to: [claude-sonnet-4-5], when: [on_wait]}\n",
			[]string{`tenants[0].fallbacks[1]: the fallbacks form a cycle, haiku → opus → sonnet → haiku: a group that takes another's requests must not send its own back, or two busy groups would trade requests; remove one direction`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(withFallbacks(tc.rules)), env())
			if diff := cmp.Diff(tc.want, messages(t, err)); diff != "" {
				t.Errorf("problems (-want +got):\n%s", diff)
			}
		})
	}
	// A chain without a cycle is fine (each rule is one hop).
	mustParse(t, withFallbacks("      - {from: sonnet, to: [haiku], when: [on_wait]}\n      - {from: haiku, to: [claude-opus-4-1], when: [on_outage]}\n"), env())
}
