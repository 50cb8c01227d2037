"""Recipes: what differs between training methods (how a batch becomes a loss, which data kind
they read); the loop itself is the one Trainer. `build_recipe(name, config)` picks one."""

from meshtron.config import JobConfig
from meshtron.train.recipes.alignment import DPORecipe, PRMRecipe, RewardModelRecipe, SimPORecipe
from meshtron.train.recipes.base import Recipe
from meshtron.train.recipes.pretrain import PretrainRecipe
from meshtron.train.recipes.ppo import PPORecipe
from meshtron.train.recipes.rl import GRPORecipe
from meshtron.train.recipes.sft import SFTRecipe

RECIPES: dict[str, type[Recipe]] = {"pretrain": PretrainRecipe, "sft": SFTRecipe, "dpo": DPORecipe,
                                    "simpo": SimPORecipe, "rm": RewardModelRecipe, "prm": PRMRecipe,
                                    "grpo": GRPORecipe, "ppo": PPORecipe}


def build_recipe(config: JobConfig) -> Recipe:
    return RECIPES[config.train.recipe](config)


__all__ = ["RECIPES", "Recipe", "build_recipe"]
