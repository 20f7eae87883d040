"""ipywidgets dashboards over plotly figures: sliders that re-measure or re-model, and a live figure.

Each dashboard runs one update when it is built, so `dash.figure` (a plain go.Figure) is ready for a
headless run. `dash.show()` is the one call a notebook makes: in a live kernel it displays the widget
(one live chart); in a headless run (`LABKIT_HEADLESS=1`, set by the notebook runner; papermill stores
no widget state) it displays the static figure of the last update and the readout as text. The live figure is a
plotly FigureWidget where `anywidget` is installed (plotly >= 6 needs it for FigureWidget) and an
ipywidgets Output that redraws the figure otherwise, so the dashboards work either way.
`update(...)` can also be called from code; it checks its values and raises LabkitError.
"""

from __future__ import annotations

import html
import math
import os
import re
import statistics
from collections.abc import Callable

import ipywidgets as widgets
import plotly.graph_objects as go
from IPython.display import clear_output, display

from labkit.measure.costs import break_even_tau, per_token_latency_s, speculative_speedup
from labkit.model.timing import ForwardCost, interleaved_runs
from labkit.decode.loop import GenerationResult, generate
from labkit.drafters import make_drafter
from labkit.core.errors import LabkitError
from labkit.core.evidence import verdict
from labkit.lab.plots import dashboard_figure, speedup_heatmap
from labkit.core.sampling import SamplingParams
from labkit.model.target import Target
from labkit.drafters.dspark import with_transition_rank
from labkit.lab.plots import position_acceptance_figure
from labkit.measure.diagnostics import offline_acceptance


def plain_text(markup: str) -> str:
    """An HTML readout as plain text, for a headless run's printout: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


class LiveFigure:
    """A figure that can be replaced in place: FigureWidget if possible, else an Output that redraws."""

    def __init__(self, fig: go.Figure):
        self.figure = fig
        try:
            self._fw: go.FigureWidget | None = go.FigureWidget(fig)
            self.widget: widgets.Widget = self._fw
        except ImportError:  # plotly's FigureWidget stub raises this when anywidget is missing
            self._fw = None
            self.widget = widgets.Output()
            self._redraw()

    def _redraw(self) -> None:
        with self.widget:
            clear_output(wait=True)
            display(self.figure)

    def show(self, fig: go.Figure) -> None:
        """Replace what is displayed by `fig` (kept as `self.figure`, a static copy)."""
        self.figure = fig
        if self._fw is None:
            self._redraw()
            return
        with self._fw.batch_update():
            if len(self._fw.data) == len(fig.data):  # same traces: update values, no flicker
                for old, new in zip(self._fw.data, fig.data):
                    old.update(new.to_plotly_json(), overwrite=True)
                self._fw.update(layout=fig.layout, overwrite=True)
            else:
                self._fw.update(dict(data=fig.data, layout=fig.layout), overwrite=True)


def headless() -> bool:
    """True when the notebook runs headlessly: the runner sets LABKIT_HEADLESS=1 in the kernel's environment."""
    return os.environ.get("LABKIT_HEADLESS", "").strip().lower() not in ("", "0", "false", "no")


def check_slider(name: str, value: float, lo: float, hi: float) -> float:
    """`value` if lo <= value <= hi, else a LabkitError naming the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not lo <= value <= hi:
        raise LabkitError(f"{name} must be a number from {lo} to {hi}, got {value!r}: move the slider "
                          f"or pass a value in that range.")
    return value


class FigureWithReadout:
    """What every dashboard offers a headless run: its last figure and its readout as plain text.
    Needs `self.live` (a LiveFigure) and `self.readout` (an ipywidgets HTML)."""

    @property
    def figure(self) -> go.Figure:
        """The figure of the last update, as a plain go.Figure (shows in a headless run)."""
        return go.Figure(self.live.figure)

    @property
    def readout_text(self) -> str:
        """The readout line as plain text (its HTML tags dropped)."""
        return plain_text(self.readout.value)


class Dashboard(FigureWithReadout):
    """Sliders + a live figure + a one-line readout; `update(**values)` redraws from code too."""

    def __init__(self, sliders: dict[str, widgets.ValueWidget], render: Callable[..., tuple[go.Figure, str]]):
        self.sliders = sliders
        self._render = render
        self._quiet = False  # True while update() moves sliders itself, so they don't re-render
        self.readout = widgets.HTML()
        self.live = LiveFigure(go.Figure())
        self.widget = widgets.VBox([widgets.HBox(list(sliders.values())), self.readout, self.live.widget])
        self.update()
        for s in sliders.values():
            s.observe(self._on_slider, names="value")

    def show(self) -> None:
        """Display the dashboard once: the live widget in a live kernel; headless, the static figure of
        the last update and the readout text (a saved notebook keeps no widget, and a static copy shown
        beside a live widget would go stale as soon as a slider moved)."""
        if headless():
            display(self.figure)
            print(self.readout_text)
        else:
            display(self.widget)

    def _on_slider(self, _change) -> None:
        if self._quiet:
            return
        try:
            self.update()
        except LabkitError as exc:  # a slider callback has nowhere to raise to: say it in the readout
            self.readout.value = f"<span style='color:#b00020'>{exc}</span>"

    def update(self, **values) -> None:
        """Redraw for the sliders' values, after setting any given as keywords (checked first)."""
        unknown = set(values) - set(self.sliders)
        if unknown:
            raise LabkitError(f"Unknown slider(s) {sorted(unknown)}: this dashboard has {sorted(self.sliders)}.")
        current = {k: s.value for k, s in self.sliders.items()} | values
        fig, text = self._render(**current)  # raises before any slider moves if a value is impossible
        self.live.show(fig)
        self.readout.value = text
        self._quiet = True
        try:
            for k in self.sliders:  # in slider order, so gamma widens tau's range before tau is set
                if k in values:
                    self.sliders[k].value = values[k]
        finally:
            self._quiet = False


def latency_explorer(cost: ForwardCost, gamma: int = 4, tau: float = 2.0, draft_ms: float = 0.0) -> Dashboard:
    """Eq. 1 to play with: block length gamma, tau and drafting cost per round -> speedup over AR.

    T_verify is the measured cost of one forward over gamma + 1 tokens (the last emitted token plus
    gamma drafts), T_AR the measured one-token forward; the heatmap covers tau 1..gamma + 1.
    """
    if cost.ks[0] != 1 or cost.ks[-1] < 2:
        raise LabkitError("latency_explorer needs forward costs measured from k=1 to at least k=2.")
    ar = cost.interp(1)
    max_gamma = cost.ks[-1] - 1
    max_draft_ms = round(3e3 * ar)
    check_slider("gamma", gamma, 1, max_gamma)
    check_slider("tau", tau, 1.0, gamma + 1.0)
    check_slider("draft_ms", draft_ms, 0.0, max_draft_ms)
    sliders = {
        "gamma": widgets.IntSlider(value=gamma, min=1, max=max_gamma, description="gamma",
                                   continuous_update=False),
        "tau": widgets.FloatSlider(value=tau, min=1.0, max=gamma + 1.0, step=0.1, description="tau",
                                   continuous_update=False),
        "draft_ms": widgets.FloatSlider(value=draft_ms, min=0.0, max=max_draft_ms, step=1.0,
                                        description="draft ms", continuous_update=False),
    }
    # Registered before the dashboard's own observer, so tau is clamped to gamma + 1 before redrawing.
    sliders["gamma"].observe(lambda change: setattr(sliders["tau"], "max", change["new"] + 1.0), names="value")

    def render(gamma: int, tau: float, draft_ms: float) -> tuple[go.Figure, str]:
        check_slider("gamma", gamma, 1, max_gamma)
        check_slider("tau", tau, 1.0, gamma + 1.0)  # at most gamma drafts + 1 target token a round
        check_slider("draft_ms", draft_ms, 0.0, max_draft_ms)
        verify, draft = cost.interp(gamma + 1), draft_ms / 1e3
        taus = [1.0 + gamma * i / 40 for i in range(41)]
        drafts = [max_draft_ms / 1e3 * i / 30 for i in range(31)]
        fig = speedup_heatmap(taus, drafts, verify, ar, marker=(tau, draft),
                              title=f"Eq. 1 at gamma={gamma}: speedup over AR (verify {1e3 * verify:.0f} ms, "
                                    f"AR step {1e3 * ar:.0f} ms)")
        speed = speculative_speedup(tau, draft, verify, ar)
        text = (f"gamma={gamma}: T_verify {1e3 * verify:.1f} ms, T_AR {1e3 * ar:.1f} ms. "
                f"L = ({draft_ms:.0f} + {1e3 * verify:.1f}) / {tau:.1f} = "
                f"<b>{1e3 * per_token_latency_s(tau, draft, verify):.1f} ms a token</b>, "
                f"<b>{speed:.2f}x</b> AR; break-even at tau = {break_even_tau(draft, verify, ar):.2f}.")
        return fig, text

    return Dashboard(sliders, render)


#: interleaved timed repeats behind each of the decoding dashboard's speed ratios
DASHBOARD_REPEATS = 3


def decoding_dashboard(target: Target, prompt_ids: list[int], gamma: int = 4, temperature: float = 0.0,
                       max_new_tokens: int = 48, seed: int = 0, max_gamma: int = 16,
                       max_temperature: float = 1.5, repeats: int = DASHBOARD_REPEATS) -> Dashboard:
    """Sliders for gamma and temperature that re-run a real generation and show tau and tokens/s.

    Each update decodes `prompt_ids` with the lab's AR loop and with speculative decoding (the
    prompt-lookup drafter proposing up to gamma tokens a round), `repeats` times each, interleaved in a
    seeded order (`labkit.model.timing.interleaved_runs`, one untimed warm-up each): the speed ratio is
    the median of the per-repeat ratios, shown with their range. It is one prompt's ratio, not the
    lab's (the bench over many prompts measures that), and the readout says so.
    """
    check_slider("gamma", gamma, 1, max_gamma)
    check_slider("temperature", temperature, 0.0, max_temperature)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise LabkitError(f"repeats is a number of timed runs: pass a whole number >= 1, got {repeats!r}.")
    sliders = {
        "gamma": widgets.IntSlider(value=gamma, min=1, max=max_gamma, description="gamma", continuous_update=False),
        "temperature": widgets.FloatSlider(value=temperature, min=0.0, max=max_temperature, step=0.1,
                                           description="temperature", continuous_update=False),
    }

    def render(gamma: int, temperature: float) -> tuple[go.Figure, str]:
        check_slider("gamma", gamma, 1, max_gamma)
        if isinstance(gamma, float) and not gamma.is_integer():
            raise LabkitError(f"gamma is a number of tokens: pass a whole number, got {gamma}.")
        check_slider("temperature", temperature, 0.0, max_temperature)
        params = SamplingParams(temperature=float(temperature))
        drafter = make_drafter("prompt-lookup", target, int(gamma))
        runs: dict[str, GenerationResult] = {}

        def decode(name: str, d) -> Callable[[], None]:
            def run():
                runs[name] = generate(target, prompt_ids, d, max_new_tokens, params, seed)
            return run

        seconds = interleaved_runs({"ar": decode("ar", None), "spec": decode("spec", drafter)}, repeats,
                                   warmup=1, seed=seed)
        ar, spec = runs["ar"], runs["spec"]  # the same tokens every repeat: one seed
        ratios = sorted((len(spec.token_ids) / s) / (len(ar.token_ids) / a) for a, s in zip(seconds["ar"], seconds["spec"]))
        ratio, low, high = statistics.median(ratios), ratios[0], ratios[-1]
        call = verdict(ratio, low, high, tie=0.02)
        tps = {"lab AR loop": len(ar.token_ids) / statistics.median(seconds["ar"]),
               f"prompt lookup (gamma={gamma})": len(spec.token_ids) / statistics.median(seconds["spec"])}
        title = (f"gamma={gamma}, temperature={temperature:.1f}: tau={spec.tau:.2f} on this prompt, "
                 f"{ratio:.2f}x the AR loop [{low:.2f}-{high:.2f}, {repeats} interleaved repeats]")
        text = (f"{len(spec.token_ids)} new tokens in {len(spec.rounds)} rounds: <b>tau {spec.tau:.2f}</b>; "
                f"{tps[f'prompt lookup (gamma={gamma})']:.1f} tokens/s against {tps['lab AR loop']:.1f} for the AR loop, "
                f"median of {repeats} interleaved repeats, ratio {ratio:.2f} [{low:.2f}-{high:.2f}]: {call}. "
                "One prompt, chosen because its answer repeats it: the bench above measures many.")
        fig = dashboard_figure(tps, spec.position_acceptance(), title, max_position=int(gamma),
                               counts=spec.position_counts())
        return fig, text

    return Dashboard(sliders, render)


def rank_explorer(model, batch: dict, rank: int | None = None, gamma: int | None = None) -> Dashboard:
    """Two sliders that change a real DSpark drafter and re-measure it on held-out blocks:

    - rank: its trained Markov transition cut to rank r by SVD (0 = DSpark's own backbone with the head
      off, a parallel drafter, but not the DFlash drafter, which was trained without a head);
    - gamma: the proposal cut to its first gamma positions.
    Each move runs the drafter's forward on the held-out batch (labkit.measure.diagnostics.offline_acceptance):
    per-position acceptance (greedy top-1 and temperature-1 1 - TV) and the tau they imply.
    """
    max_rank, max_gamma = model.cfg.rank, model.cfg.gamma
    rank = max_rank if rank is None else rank
    gamma = max_gamma if gamma is None else gamma
    check_slider("rank", rank, 0, max_rank)
    check_slider("gamma", gamma, 1, max_gamma)
    ranks = sorted({0, max_rank} | {2 ** i for i in range(int(math.log2(max(max_rank, 1))) + 1)})
    sliders = {"rank": widgets.SelectionSlider(options=ranks, value=min(ranks, key=lambda r: abs(r - rank)),
                                               description="rank", continuous_update=False),
               "gamma": widgets.IntSlider(value=gamma, min=1, max=max_gamma, description="gamma",
                                          continuous_update=False)}

    def render(rank: int, gamma: int) -> tuple[go.Figure, str]:
        check_slider("rank", rank, 0, max_rank)
        check_slider("gamma", gamma, 1, max_gamma)
        acc = offline_acceptance(with_transition_rank(model, int(rank)), batch, int(gamma))
        fig = position_acceptance_figure({"greedy": acc.accept_greedy, "T=1": acc.accept_t1})
        fig.update_layout(title=f"rank {rank}, gamma {gamma}: acceptance given the true prefix, by position",
                          xaxis_range=[0.5, max_gamma + 0.5])
        text = (f"rank {rank}, gamma {gamma}: <b>tau {acc.tau_greedy:.2f}</b> greedy, <b>{acc.tau_t1:.2f}</b> at "
                f"temperature 1, on {int(batch['valid'][..., 0].sum())} held-out blocks")
        return fig, text

    return Dashboard(sliders, render)
