"""Proof that tests/test_learning.py catches wiring bugs: each mutation below breaks one wire of a script, in a
copy of the repository, and runs that script's learning test on the copy; the test must fail for every one.

    .venv/bin/python tests/learning_mutations.py               # all (about 20 min on 2 cores)
    .venv/bin/python tests/learning_mutations.py --only dqn    # the mutations whose name starts with `dqn`

First the unmutated tests run (they must pass), then each mutation; a table of outcomes is printed and the
exit status is 1 when a mutation survives (its test passed) or no longer applies to the code.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PPO, DQN, RAINBOW, SAC = (f"cleanrl_pool/{name}.py" for name in
                          ("ppo_procgen_impoola", "dqn_atari_gap", "rainbow_atari_gap", "sac_dmc_gap"))
TESTS = {"ppo": "test_ppo_learns_the_cue_task_through_main and avg", "dqn": "test_dqn_learns",
         "rainbow": "test_rainbow_der_learns", "sac": "test_sac_learns"}
# (name, what breaks, file, text, replacement): the text must occur exactly once in the file. Only the mutations the
# tests catch are listed; README ("Does it learn?") names those the toy tasks cannot see, and why.
MUTATIONS = [
    ("ppo_advantage_sign", "the surrogate ascends -advantage", PPO,
     "policy_loss = torch.max(-advantages * ratio, -advantages * torch.clamp(",
     "policy_loss = torch.max(advantages * ratio, advantages * torch.clamp("),
    ("ppo_gae_no_lambda_carry", "GAE keeps only the one-step TD error (the delayed reward never reaches the cue step)", PPO,
     "advantages[t] = last_gae = delta + gamma * gae_lambda * next_nonterminal * last_gae",
     "advantages[t] = last_gae = delta"),
    ("dqn_next_obs_wrong_slot", "the target's next observation is taken one slot early (o_t itself at n = 1)", DQN,
     '"next_observations": stack_frames(replay, env_index, slot_time + steps, frame_stack)',
     '"next_observations": stack_frames(replay, env_index, slot_time + steps - 1, frame_stack)'),
    ("dqn_target_never_synced", "the target network keeps its initial weights", DQN,
     "                soft_update(target_network, q_network, args.tau)\n", "                pass\n"),
    ("dqn_no_frame_history", "the replay rebuilds stacks of the newest frame only", DQN,
     "times.append(torch.where(replay[\"episode_start\"][env_index, previous % capacity], previous, previous - 1))",
     "times.append(previous)"),
    ("rainbow_log_softmax_over_actions", "the loss normalises the logits over actions, not over the atoms", RAINBOW,
     'log_probs = logits[rows, batch["actions"]].log_softmax(dim=-1)',
     'log_probs = logits.log_softmax(dim=1)[rows, batch["actions"]]'),
    ("rainbow_loss_on_the_next_action", "the loss trains the online distribution of the target's greedy next action, "
     "not of the action taken", RAINBOW,
     'log_probs = logits[rows, batch["actions"]].log_softmax(dim=-1)',
     'log_probs = logits[rows, next_actions].log_softmax(dim=-1)'),
    ("rainbow_frame_one_slot_early", "each new frame is stored in the slot of the observation it follows", RAINBOW,
     'utils.write_slot(replay, "frames", next_slot, next_obs[:, -1])',
     'utils.write_slot(replay, "frames", slot, next_obs[:, -1])'),
    ("sac_actor_loss_sign", "the actor minimises alpha log pi + Q (it runs from the critic's value)", SAC,
     "actor_loss = (log_alpha.exp().detach() * log_prob - torch.min(q1, q2)).mean()",
     "actor_loss = (log_alpha.exp().detach() * log_prob + torch.min(q1, q2)).mean()"),
    ("sac_actor_without_q_gradient", "the actor's actions reach the critic detached: no gradient of Q to the actor", SAC,
     "q1, q2 = critic(features, actions)", "q1, q2 = critic(features, actions.detach())"),
    ("sac_actor_step_skipped", "the actor's optimiser never steps (its gradients are computed and dropped)", SAC,
     "            actor_optimizer.step()\n", "            pass\n"),
]


def copy_repository(folder: str):
    for part in ("cleanrl_pool", "tests"):
        shutil.copytree(os.path.join(REPO, part), os.path.join(folder, part), ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, "pytest.ini"), folder)


def run_test(folder: str, script: str) -> tuple:
    """(passed, seconds, the last line of the failure) of `script`'s learning test in the copy at `folder`."""
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_learning.py", "-k", TESTS[script], "-x", "-q",
                             "-p", "no:cacheprovider"], cwd=folder, capture_output=True, text=True)
    failure = [line[1:].strip() for line in result.stdout.splitlines() if line.startswith("E ") and "assert" in line][:1]
    return result.returncode == 0, time.time() - start, failure[0] if failure else result.stdout.strip().splitlines()[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only the mutations whose name starts with this")
    args = parser.parse_args()
    chosen = [mutation for mutation in MUTATIONS if mutation[0].startswith(args.only)]
    if not chosen:
        sys.exit(f"error: no mutation starts with {args.only!r}")
    rows, survived = [], False
    for script in sorted({name.split("_")[0] for name, *_ in chosen}):
        with tempfile.TemporaryDirectory() as folder:
            copy_repository(folder)
            passed, seconds, _ = run_test(folder, script)
        rows.append((f"{script} (unmutated)", "passes" if passed else "FAILS", seconds, ""))
        survived |= not passed
    for name, what, path, text, replacement in chosen:
        with tempfile.TemporaryDirectory() as folder:
            copy_repository(folder)
            target = os.path.join(folder, path)
            with open(target) as f:
                source = f.read()
            if source.count(text) != 1:
                rows.append((name, f"DOES NOT APPLY ({source.count(text)} matches)", 0.0, what))
                survived = True
                continue
            with open(target, "w") as f:
                f.write(source.replace(text, replacement))
            passed, seconds, failure = run_test(folder, name.split("_")[0])
        rows.append((name, "SURVIVED" if passed else "caught", seconds, f"{what}; {failure}"))
        survived |= passed
        print(f"{name}: {rows[-1][1]} ({seconds:.0f} s)", flush=True)
    print("\n| mutation | learning test | seconds | what breaks; the failing assertion |\n|---|---|---|---|")
    for name, outcome, seconds, detail in rows:
        print(f"| {name} | {outcome} | {seconds:.0f} | {detail.replace('|', '/')} |")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
