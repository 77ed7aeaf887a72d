"""The main job (`make demo`). Until the training curriculum lands this builds a `nano` model from its preset,
saves it, reloads it through `AutoModelForCausalLM` with `trust_remote_code` and holds a short multi-turn exchange
(token ids only: the model is untrained), showing the memory change from turn to turn."""

import torch
from transformers import AutoModelForCausalLM

import modeling_rxt
from configuration import load_preset


def main(output_dir: str = "runs/demo/hub") -> None:
    torch.manual_seed(0)
    model = modeling_rxt.RxTForCausalLM(load_preset("nano")).eval()
    model.save_pretrained(output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True).eval()
    state = reloaded.init_memory(batch_size=1)
    for turn in range(1, 4):
        query = torch.randint(10, reloaded.config.vocab_size, (1, 8))
        answer = reloaded.generate(query, memory_state=state, max_new_tokens=8, do_sample=False)
        new_state = reloaded.update_memory(state, answer)
        change = (new_state.stm - state.stm).norm() / state.stm.norm()
        print(f"turn {turn}: answer ids {answer[0, 8:].tolist()}  relative memory change {change:.3f}")
        state = new_state
    print(f"saved and reloaded {type(reloaded).__name__} from {output_dir}")


if __name__ == "__main__":
    main()
